"""API keys (issue 40): `cak_` + 43 base64url characters, stored only as their SHA-256,
accepted by the gateway's Authenticator wherever a JWT is, refused within 5 s of
`keys revoke`; `keys` on the command line and `usage --by key`."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import trio
import trio.testing

from actors.adapters.postgres import Postgres
from actors.errors import TransientError
from gateway.auth import (
    KEY_CACHE_S,
    MALFORMED_KEY,
    TOUCH_WAIT_S,
    UNKNOWN_KEY,
    Authenticator,
    Caller,
    Unauthorized,
    Verifier,
)
from tests.helpers import JWT_SECRET, ROOT
from tools.cli import main as cli
from tools.local_stack import free_port

KEY = re.compile(r"cak_[A-Za-z0-9_-]{43}")
VERIFIER = Verifier(key=JWT_SECRET, algorithm="HS256", audience=None, issuer=None,
                    user_claim="sub")


def new_user() -> str:
    return f"keys-{uuid.uuid4().hex[:10]}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the keys table ------------------------------------------------------------------------

async def test_a_key_is_found_by_its_hash_and_its_secret_is_stored_nowhere(pg, db):
    user = new_user()
    key_id, key = await pg.create_key(user_id=user, name="laptop")
    assert KEY.fullmatch(key) and re.fullmatch(r"key_[0-9a-f]{24}", key_id)
    assert await pg.key_owner(sha256(key)) == (key_id, user)
    assert await pg.key_owner(sha256(key[:-1] + ("A" if key[-1] != "A" else "B"))) is None
    (row,) = db.execute("SELECT row_to_json(k)::text FROM llm_api_keys k WHERE id = %s",
                        (key_id,)).fetchone()
    secret = key.removeprefix("cak_")
    assert secret not in row and secret[:20] not in row and secret[-20:] not in row
    assert sha256(key) in row
    (listed,) = await pg.list_keys(user_id=user)
    assert listed["shown"] == f"cak_…{key[-4:]}"
    assert (listed["id"], listed["name"], listed["user"], listed["last_used"],
            listed["revoked"]) == (key_id, "laptop", user, None, None)
    second_id, second = await pg.create_key(user_id=user)
    assert second != key and second_id != key_id
    assert [k["id"] for k in await pg.list_keys(user_id=user)] == [key_id, second_id]
    assert key_id in [k["id"] for k in await pg.list_keys()]


async def test_a_revoked_key_has_no_owner_and_stays_listed_as_revoked(pg):
    user = new_user()
    key_id, key = await pg.create_key(user_id=user)
    assert await pg.revoke_key(key_id) is True
    assert await pg.key_owner(sha256(key)) is None
    (first,) = await pg.list_keys(user_id=user)
    assert first["revoked"] is not None
    assert await pg.revoke_key(key_id) is True  # again: still revoked, since the first time
    assert (await pg.list_keys(user_id=user))[0]["revoked"] == first["revoked"]
    assert await pg.revoke_key("key_" + "0" * 24) is False


# -- the Authenticator on the real table ------------------------------------------------------

async def test_a_key_names_its_user_until_revoked_then_within_the_cache_period_no_more(
        pg, db, mock_clock):
    user = new_user()
    key_id, key = await pg.create_key(user_id=user)
    auth = Authenticator(VERIFIER, pg)
    assert await auth.identify(f"Bearer {key}") == Caller(user=user, key_id=key_id)
    (used,) = db.execute("SELECT last_used_at FROM llm_api_keys WHERE id = %s",
                         (key_id,)).fetchone()
    assert used is not None
    assert await pg.revoke_key(key_id)
    mock_clock.jump(KEY_CACHE_S - 0.5)  # still the cached answer
    assert (await auth.identify(f"bearer  {key} ")).user == user
    mock_clock.jump(0.5)  # KEY_CACHE_S after the lookup: asked again, refused
    with pytest.raises(Unauthorized, match=f"^{UNKNOWN_KEY}$"):
        await auth.identify(f"Bearer {key}")
    assert KEY_CACHE_S < 5  # `keys revoke` reaches every gateway within 5 s


async def test_a_well_formed_key_nobody_made_is_401():
    fake = CountingKeys()
    auth = Authenticator(VERIFIER, fake)
    with pytest.raises(Unauthorized, match=f"^{UNKNOWN_KEY}$"):
        await auth.identify("Bearer cak_" + "A" * 43)
    assert fake.lookups == 1


async def test_a_lookup_while_postgres_is_down_is_a_transient_error():
    away = Postgres(dsn=f"postgresql://u:pw@127.0.0.1:{free_port()}/x", pool_size=1)
    try:
        with pytest.raises(TransientError, match="postgres: OperationalError"):
            await Authenticator(VERIFIER, away).identify("Bearer cak_" + "B" * 43)
    finally:
        away.close()


# -- the Authenticator with a fake of its port -------------------------------------------------

@dataclass
class CountingKeys:
    """A KeyLookup of fixed keys that counts its queries; `gate` holds each lookup until
    set, `down` fails it, `touch_fails` / `touch_hangs` break the last-use write."""

    owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    lookups: int = 0
    touches: int = 0
    gate: trio.Event | None = None
    down: bool = False
    touch_fails: bool = False
    touch_hangs: bool = False

    def add(self, user: str) -> str:
        key = "cak_" + uuid.uuid4().hex + "0" * 11
        self.owners[sha256(key)] = (f"key_{len(self.owners):024x}", user)
        return key

    async def key_owner(self, secret_sha256: str) -> tuple[str, str] | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise TransientError("postgres: OperationalError: connection refused")
        return self.owners.get(secret_sha256)

    async def touch_key(self, key_id: str) -> None:
        self.touches += 1
        if self.touch_hangs:
            await trio.sleep_forever()
        if self.touch_fails:
            raise TransientError("postgres: OperationalError: connection refused")



async def test_the_cache_answers_within_its_period_found_or_not(autojump_clock):
    fake = CountingKeys()
    key, unknown = fake.add("alice"), "cak_" + "C" * 43
    auth = Authenticator(VERIFIER, fake)
    for _ in range(3):
        assert (await auth.identify(f"Bearer {key}")).user == "alice"
        with pytest.raises(Unauthorized, match=UNKNOWN_KEY):
            await auth.identify(f"Bearer {unknown}")
        await trio.sleep(KEY_CACHE_S / 3 - 0.01)
    assert fake.lookups == 2  # one each, in 4 s
    await trio.sleep(0.1)
    await auth.identify(f"Bearer {key}")
    assert fake.lookups == 3


async def test_the_cache_is_bounded_least_recently_used_out(autojump_clock):
    fake = CountingKeys()
    first, second, third = (fake.add(u) for u in ("a", "b", "c"))
    auth = Authenticator(VERIFIER, fake, cache_size=2)
    for key in (first, second, first, third):  # `second` is the least recently used
        await auth.identify(f"Bearer {key}")
    assert fake.lookups == 3
    await auth.identify(f"Bearer {first}")
    assert fake.lookups == 3
    await auth.identify(f"Bearer {second}")
    assert fake.lookups == 4


async def test_requests_for_one_key_at_once_share_one_lookup(autojump_clock):
    fake = CountingKeys(gate=trio.Event())
    key = fake.add("alice")
    auth = Authenticator(VERIFIER, fake)
    callers: list[Caller] = []

    async def ask() -> None:
        callers.append(await auth.identify(f"Bearer {key}"))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        fake.gate.set()
    assert fake.lookups == 1 and {c.user for c in callers} == {"alice"} and len(callers) == 50


async def test_a_shared_lookup_that_fails_fails_every_request_that_waited_on_it(autojump_clock):
    fake = CountingKeys(gate=trio.Event(), down=True)
    key = fake.add("alice")
    auth = Authenticator(VERIFIER, fake)
    failed: list[str] = []

    async def ask() -> None:
        try:
            await auth.identify(f"Bearer {key}")
        except TransientError as exc:
            failed.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        fake.gate.set()
    assert fake.lookups == 1 and len(failed) == 20
    assert set(failed) == {"postgres: OperationalError: connection refused"}
    fake.down = False  # a failure is not cached: the next request asks again
    assert (await auth.identify(f"Bearer {key}")).user == "alice"
    assert fake.lookups == 2


async def test_a_cancelled_lookup_leaves_the_next_request_to_ask_again(autojump_clock):
    fake = CountingKeys(gate=trio.Event())
    key = fake.add("alice")
    auth = Authenticator(VERIFIER, fake)
    with trio.move_on_after(1):
        await auth.identify(f"Bearer {key}")
    fake.gate.set()
    assert (await auth.identify(f"Bearer {key}")).user == "alice"
    assert fake.lookups == 2


async def test_last_use_is_written_at_most_once_a_minute_per_key(autojump_clock):
    fake = CountingKeys()
    key, other = fake.add("alice"), fake.add("bob")
    auth = Authenticator(VERIFIER, fake)
    for _ in range(59):
        await auth.identify(f"Bearer {key}")
        await trio.sleep(1)
    assert fake.touches == 1
    await auth.identify(f"Bearer {other}")
    assert fake.touches == 2
    await trio.sleep(1)  # 60 s after the first write
    await auth.identify(f"Bearer {key}")
    assert fake.touches == 3


async def test_a_failing_or_hanging_last_use_write_never_fails_nor_holds_the_request(
        autojump_clock, caplog):
    fake = CountingKeys(touch_fails=True)
    key = fake.add("alice")
    auth = Authenticator(VERIFIER, fake)
    with caplog.at_level(logging.WARNING, logger="chat_actors.gateway.auth"):
        assert (await auth.identify(f"Bearer {key}")).user == "alice"
    assert "its last use was not recorded: postgres: OperationalError" in caplog.text
    hanging = CountingKeys(touch_hangs=True)
    key = hanging.add("bob")
    started = trio.current_time()
    assert (await Authenticator(VERIFIER, hanging).identify(f"Bearer {key}")).user == "bob"
    assert trio.current_time() - started == pytest.approx(TOUCH_WAIT_S)


def _jwt(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")


async def test_a_jwt_is_checked_as_before_and_never_looked_up_as_a_key():
    fake = CountingKeys()
    auth = Authenticator(VERIFIER, fake)
    assert await auth.identify(f"Bearer {_jwt('alice')}") == Caller(user="alice", key_id=None)
    # A JWT naming a key as its user is a JWT (its claim is a user id like any other).
    assert (await auth.identify(f"Bearer {_jwt('cak_x')}")).user == "cak_x"
    assert fake.lookups == 0


MALFORMED = f"^{re.escape(MALFORMED_KEY)}$"
BEARER_ONLY = "^the Authorization header must be: Bearer <token>$"


@pytest.mark.parametrize(("authorization", "reason"), [
    ("Bearer cak_" + "A" * 1_000_000, MALFORMED),  # a megabyte
    ("Bearer cak_" + "é" * 43, MALFORMED),  # non-ASCII (a header's latin-1)
    ("Bearer cak_" + "\u0416" * 43, MALFORMED),
    ("Bearer cak_" + "A" * 42, MALFORMED),
    ("Bearer cak_" + "A" * 44, MALFORMED),
    ("Bearer cak_" + "A" * 40 + "+/=", MALFORMED),  # base64's alphabet, not base64url's
    ("Bearer cak_" + "A" * 42 + "\x00", MALFORMED),
    ("Bearer cak_" + "A" * 20 + "." + "A" * 22, MALFORMED),
    ("Bearer cak_", MALFORMED),
    ("Bearer ", BEARER_ONLY),  # an empty bearer
    ("Bearer    ", BEARER_ONLY),
    ("Basic cak_" + "A" * 43, BEARER_ONLY),
    ("", "^missing Authorization: Bearer <token>$"),
    (None, "^missing Authorization: Bearer <token>$"),
    # Not a key: the JWT path, as every token before keys.
    ("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYWtfIn0.c2ln", "^invalid token: "),
    ("Bearer CAK_" + "A" * 43, "^invalid token: "),
    ("Bearer " + "x" * 1_000_000, "^invalid token: "),
], ids=["megabyte", "latin-1", "cyrillic", "42", "44", "plus-slash-equals", "nul", "dot",
        "prefix-alone", "empty", "blank", "basic", "no-header", "none", "jwt-looking",
        "upper-case-prefix", "megabyte-jwt"])
async def test_a_hostile_token_gets_its_reason_and_never_reaches_the_lookup(
        authorization, reason):
    fake = CountingKeys()
    auth = Authenticator(VERIFIER, fake)
    with pytest.raises(Unauthorized, match=reason):
        await auth.identify(authorization)
    assert fake.lookups == 0


# -- the command line ----------------------------------------------------------------------

@pytest.fixture
def pg_config(stack, tmp_path) -> Path:
    path = tmp_path / "pg.toml"
    path.write_text(f'[postgres]\ndsn = "{stack.postgres.url}"\n')
    assert cli(["migrate", "--config", str(path)]) == 0
    return path


def keys(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "keys", *args,
                           "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


async def test_keys_create_prints_the_key_last_and_list_shows_only_its_last_4(pg_config, pg):
    user = new_user()
    made = await trio.to_thread.run_sync(
        lambda: keys(pg_config, "create", "--user", user, "--name", "CI runner"))
    assert made.returncode == 0, made.stderr
    *said, key = made.stdout.splitlines()
    assert KEY.fullmatch(key)
    (key_id,) = re.findall(r"\bkey_[0-9a-f]{24}\b", "\n".join(said))
    assert "shown this once" in "\n".join(said)
    # The key it printed is the one the gateway takes, as that user.
    assert await Authenticator(VERIFIER, pg).identify(f"Bearer {key}") == Caller(user, key_id)
    listed = await trio.to_thread.run_sync(lambda: keys(pg_config, "list", "--user", user))
    assert listed.returncode == 0, listed.stderr
    head, row = listed.stdout.splitlines()
    assert head.split("  ")[0] == "id" and "last used" in head and "revoked" in head
    assert row.startswith(f"{key_id}  CI runner  {user}  cak_…{key[-4:]}  ")
    assert key not in listed.stdout and key[4:-4] not in listed.stdout
    assert row.split()[-1] == "-"  # not revoked
    gone = await trio.to_thread.run_sync(lambda: keys(pg_config, "revoke", key_id))
    assert gone.returncode == 0 and "within 5 s" in gone.stdout, gone.stderr
    listed = await trio.to_thread.run_sync(lambda: keys(pg_config, "list", "--user", user))
    assert re.search(r"\d\d:\d\d:\d\d$", listed.stdout.splitlines()[1])  # its revocation


@pytest.mark.parametrize(("args", "said"), [
    (("revoke", "key_" + "0" * 24), "chat-actors keys revoke: no key key_000000000000000000000000 "
                                    "(`keys list` shows the ids)"),
    (("revoke", "not-a-key-id"), "argument ID: 'not-a-key-id' is not a key id: key_ and 24 hex "
                                 "digits (see `keys list`)"),
    (("revoke", "cak_" + "A" * 43), "argument ID: that is a key, not its id"),
    (("create", "--user", "alice smith"), "argument --user: 'alice smith' is not a userId: "
                                          "1-128 characters of A-Z a-z 0-9 . _ : -"),
    (("create", "--user", "alice\n"), "argument --user: 'alice\\n' is not a userId"),
    (("create", "--user", "a" * 129), "is not a userId"),
    (("create", "--user", "alice", "--name", "two\nlines"), "argument --name: a key's name is "
                                                            "1-100 printable characters"),
    (("create",), "the following arguments are required: --user"),
    (("list", "--user", ""), "argument --user: '' is not a userId"),
])
def test_keys_with_a_bad_argument_says_what_is_wrong_and_exits_non_zero(pg_config, args, said):
    done = keys(pg_config, *args)
    assert done.returncode != 0 and done.stdout == ""
    assert said in done.stderr and "Traceback" not in done.stderr
    assert "cak_" + "A" * 43 not in done.stderr  # a key given by mistake is not echoed


def test_keys_with_postgres_down_says_so_in_one_line(tmp_path):
    config = tmp_path / "down.toml"
    config.write_text(f'[postgres]\ndsn = "postgresql://u:pw-secret@127.0.0.1:{free_port()}/x"\n')
    done = keys(config, "create", "--user", "alice")
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("chat-actors: postgres at postgresql://u:***@127.0.0.1:")
    assert "pw-secret" not in done.stderr


def test_usage_by_key_groups_jobs_by_the_key_that_sent_them(pg_config, db, capsys):
    user = new_user()
    for key_id, model, tokens, cost in (("key_a", "fast", 10, 0.5), ("key_a", "fast", 5, 0.25),
                                        ("key_b", "fast", 7, 1.0), (None, "fast", 3, 0.125),
                                        ("key_a", "big", 100, 2.0)):
        db.execute("INSERT INTO llm_jobs (job_id, user_id, session_id, status, model, "
                   "prompt_tokens, completion_tokens, cost_usd, api_key_id) "
                   "VALUES (%s, %s, 's', 'completed', %s, %s, 1, %s, %s)",
                   (uuid.uuid4().hex, user, model, tokens, cost, key_id))
    capsys.readouterr()
    assert cli(["usage", "--config", str(pg_config), "--user", user, "--by", "key"]) == 0
    head, *rows, total = (line.split() for line in capsys.readouterr().out.splitlines())
    assert head[:4] == ["user", "key", "model", "jobs"]
    # user, key, model, jobs, prompt tokens, ..., cost USD
    assert [(r[1], r[2], r[3], r[4], r[-1]) for r in rows] == [
        ("-", "fast", "1", "3", "0.125000"),  # a JWT's job
        ("key_a", "big", "1", "100", "2.000000"),
        ("key_a", "fast", "2", "15", "0.750000"),
        ("key_b", "fast", "1", "7", "1.000000")]
    assert (total[0], total[1], total[-1]) == ("total", "5", "3.875000")
    # Without --by, the table of before: by user and model.
    assert cli(["usage", "--config", str(pg_config), "--user", user]) == 0
    head, *rows, _ = (line.split() for line in capsys.readouterr().out.splitlines())
    assert head[:3] == ["user", "model", "jobs"]
    assert [(r[1], r[2], r[3]) for r in rows] == [("big", "1", "100"), ("fast", "4", "25")]
