"""Configuration: config/default.toml, overlaid by a file, overlaid by the environment.

Every problem is reported as a ConfigError naming the key and where its value
came from, before anything starts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

import msgspec
from msgspec import Meta

from messages.wire import ChatRequest, decode_request

T = TypeVar("T")
DEFAULT_FILE = Path(__file__).with_name("default.toml")
ENV_PREFIX = "CHAT_ACTORS__"
OWN_COLLECTION = "user-"  # + a userId: that user's own collection, where their uploads go


def own_collection(user_id: str) -> str:
    """The RAG collection that is `user_id`'s own (searched first, written by uploads)."""
    return OWN_COLLECTION + user_id

Positive = Annotated[int, Meta(gt=0)]
# Float bounds written as floats: typing caches Annotated types by equality (0 == 0.0),
# so the first module to spell one decides how every equal one renders in a schema.
PositiveFloat = Annotated[float, Meta(gt=0.0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Name = Annotated[str, Meta(min_length=1)]
# An endpoint a client connects to: http(s) with a host. "localhost:8000/v1" would only
# fail at the first request, deep in a vendor library.
_HTTP_URL = r"^https?://[^\s/?#]+[^\s]*$"
_OPTIONAL_HTTP_URL = r"^(https?://[^\s/?#]+[^\s]*)?$"
HttpUrl = Annotated[str, Meta(pattern=_HTTP_URL, max_length=2048)]
OptionalHttpUrl = Annotated[str, Meta(pattern=_OPTIONAL_HTTP_URL, max_length=2048)]
# What a pattern means, for the error line (msgspec would print the regex).
# A host name as an allow-list holds it: lower case, no scheme, port or path.
_HOST_NAME = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
_REDIS_URL = r"^(redis|rediss|unix|redis\+sentinel)://"
_PATTERN_RULES = {_HTTP_URL: "must be an http:// or https:// URL with a host",
                  _REDIS_URL: "must be a redis://, rediss://, unix:// or redis+sentinel:// URL",
                  _HOST_NAME: "must be a lower-case host name (no scheme, port or path)",
                  _OPTIONAL_HTTP_URL: "must be empty or an http:// or https:// URL with a host"}


class ConfigError(ValueError):
    """The configuration is wrong; the message says which key and why."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Kafka(_Section, frozen=True):
    bootstrap_servers: Name
    request_topic: Name
    control_topic: Name
    dlq_topic: Name
    group_id: Name
    session_timeout_ms: Annotated[int, Meta(ge=1000)]
    fetch_wait_max_ms: Annotated[int, Meta(ge=0, le=10000)]
    poll_batch: Positive
    partitions: Positive
    consumer: dict[str, str | int | float | bool]
    producer: dict[str, str | int | float | bool]
    sasl_password_env: str = "CHAT_ACTORS_KAFKA_PASSWORD"

    def client(self, role: Literal["producer", "consumer"]) -> dict[str, str | int | float | bool]:
        """librdkafka settings of a producer (and admin client) or a consumer: [kafka.<role>],
        plus `sasl.password` from $<sasl_password_env> when that is set."""
        settings = dict(self.producer if role == "producer" else self.consumer)
        password = secret(self.sasl_password_env) if self.sasl_password_env else None
        if password is not None:
            settings["sasl.password"] = password
        return settings


class Redis(_Section, frozen=True):
    url: Annotated[str, Meta(pattern=_REDIS_URL)]
    password_env: str
    socket_timeout_s: PositiveFloat
    cluster: bool = False
    replica_wait_ms: Annotated[int, Meta(ge=0, le=60000)] = 1000
    sentinel_password_env: str = ""

    def sentinel(self) -> SentinelUrl | None:
        """The sentinels and service a redis+sentinel:// url names; None for any other."""
        return sentinel_url(self.url)


SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379


class SentinelUrl(msgspec.Struct, frozen=True):
    """`redis+sentinel://[user@]host[:port][,host[:port]...]/service[/db]`: the sentinels
    to ask (port 26379 unless given), the service they name the primary of, its database,
    and the ACL user of the primary (its password comes from redis.password_env)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None


def sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a redis+sentinel:// URL (None for any other scheme); a malformed one
    is a ConfigError saying what is wrong."""
    if not url.startswith(SENTINEL_SCHEME):
        return None

    def wrong(why: str) -> ConfigError:
        return ConfigError(f"redis.url: {why} (expected redis+sentinel://[user@]host[:port]"
                           "[,host[:port]...]/service[/db])")

    rest = url.removeprefix(SENTINEL_SCHEME)
    if "?" in rest or "#" in rest:
        raise wrong("a Sentinel URL takes no query or fragment")
    if any(c.isspace() for c in rest):
        raise wrong("white space in the URL")
    netloc, _, path = rest.partition("/")
    username = None
    if "@" in netloc:
        user, _, netloc = netloc.rpartition("@")
        if ":" in user:
            raise wrong("a password does not go in the URL: set it in the environment "
                        "variable redis.password_env names (redis.sentinel_password_env "
                        "for the sentinels)")
        username = urllib.parse.unquote(user) or None
    sentinels = tuple(_sentinel_node(node, wrong) for node in netloc.split(","))
    service, _, db = path.partition("/")
    service = urllib.parse.unquote(service)
    if not service:
        raise wrong("no service name after the sentinels")
    db = db.removesuffix("/")
    if db and not (db.isascii() and db.isdigit() and len(db) <= 5):
        raise wrong(f"database {db!r} is not a number")
    return SentinelUrl(sentinels=sentinels, service=service, db=int(db or 0), username=username)


def _sentinel_node(node: str, wrong: Callable[[str], ConfigError]) -> tuple[str, int]:
    if node.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, port = node[1:].partition("]")
        if port and not port.startswith(":"):
            raise wrong(f"sentinel {node!r}: text after the bracketed address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise wrong(f"sentinel {node!r}: {host!r} in brackets is not an IPv6 address") from None
        port = port[1:]
    else:
        host, _, port = node.rpartition(":") if ":" in node else (node, "", "")
        if ":" in host:
            raise wrong(f"sentinel {node!r}: an IPv6 address goes in brackets")
        if host and not re.fullmatch(r"[A-Za-z0-9._-]+", host):
            raise wrong(f"sentinel {node!r}: {host!r} is not a host name or address")
    if not host:
        raise wrong(f"a sentinel without a host ({node!r})")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise wrong(f"sentinel {node!r}: port {port!r} is not 1-65535")
    return host, int(port) if port else SENTINEL_PORT


class JobKeys(msgspec.Struct, frozen=True):
    """Every Redis key of one job (contract 5). In cluster mode the job id is a hash tag,
    `{<jobId>}`, so all of a job's keys share a slot and one script may touch them."""

    stream: str  # the events a client reads
    attempt: str  # the attempt that holds the job (contract 6.11)
    done: str  # set with the job's appended `done`
    seq_prefix: str  # + attempt: the highest seq written for that attempt
    own_stream: bool = True  # False: the template names one stream shared by many jobs

    def seq(self, attempt: int) -> str:
        return f"{self.seq_prefix}{attempt}"


def job_keys(key_template: str, job_id: str, *, cluster: bool) -> JobKeys:
    """The one function that names a job's Redis keys (gateways apply the same rule)."""
    tag = f"{{{job_id}}}" if cluster else job_id
    return JobKeys(stream=key_template.replace("{job_id}", tag),
                   attempt=f"chat-actors:attempt:{tag}", done=f"chat-actors:done:{tag}",
                   seq_prefix=f"chat-actors:seq:{tag}:",
                   own_stream="{job_id}" in key_template)


class Stream(_Section, frozen=True):
    key_template: Name
    ttl_s: Positive
    maxlen: Positive
    batch: Positive


class Postgres(_Section, frozen=True):
    dsn: Name
    pool_size: Positive
    batch: Positive
    statement_timeout_s: PositiveFloat
    # psycopg prepares a query run this many times on a connection; "" never prepares
    # (PgBouncer in transaction mode hands each transaction another server connection).
    prepare_threshold: Annotated[int, Meta(ge=0)] | Literal[""] = 5

    @property
    def prepare_after(self) -> int | None:
        """psycopg's Connection.prepare_threshold: None never prepares."""
        return None if self.prepare_threshold == "" else self.prepare_threshold


class ModelAlias(_Section, frozen=True):
    model: Name
    api_base: HttpUrl | None = None
    api_key_env: str | None = None
    fallbacks: list[str] = []
    context_window: Annotated[int, Meta(ge=64)] = 8192
    max_tokens: Positive = 512
    input_cost_per_token: Annotated[float, Meta(ge=0.0)] | None = None
    output_cost_per_token: Annotated[float, Meta(ge=0.0)] | None = None
    cache_read_cost_per_token: Annotated[float, Meta(ge=0.0)] | None = None
    cache_write_cost_per_token: Annotated[float, Meta(ge=0.0)] | None = None
    # auto: OpenAI-wire vendors stream natively, others through LiteLLM (see openai_wire).
    stream_path: Literal["auto", "openai", "litellm"] = "auto"
    # What the model takes (contract 2.1 v2); unset: what LiteLLM's model map says.
    vision: bool | None = None
    tools: bool | None = None
    reasoning: bool | None = None
    continues: bool | None = None  # continues a trailing assistant turn; unset: see default.toml
    # Request parameters this alias's vendor refuses though the model map says it takes
    # them (a request's value for one is dropped, never an error).
    drop_params: list[Literal["temperature", "topP", "stop", "seed", "reasoningEffort"]] = []
    # Passed to the vendor call as is (say Anthropic's `thinking` with `display`): what
    # the model map does not know. Keys the worker sets itself are refused (EXTRA_RESERVED).
    extra_params: dict[str, Any] = {}


# What the worker sets on every vendor call itself, from the request or its own logic:
# not for an alias's extra_params to replace.
EXTRA_RESERVED = frozenset({
    "model", "messages", "stream", "stream_options", "tools", "tool_choice", "functions",
    "function_call", "max_tokens", "max_completion_tokens", "response_format", "temperature",
    "top_p", "stop", "seed", "reasoning_effort", "api_key", "api_base", "base_url",
    "timeout", "num_retries", "n", "user", "metadata"})


class Llm(_Section, frozen=True):
    default_model: Name
    system_prompt: str
    max_history_turns: Annotated[int, Meta(ge=0)]
    retries: Annotated[int, Meta(ge=0, le=10)]
    retry_backoff_s: PositiveFloat
    retry_backoff_cap_s: PositiveFloat
    models: dict[str, ModelAlias]


class Jobs(_Section, frozen=True):
    timeout_s: PositiveFloat
    first_token_timeout_s: PositiveFloat
    idle_timeout_s: PositiveFloat
    max_in_flight: Positive
    lease_s: PositiveFloat
    session_queue_max: Positive
    session_wait_s: PositiveFloat


class Rag(_Section, frozen=True):
    path: Name
    chroma_url: OptionalHttpUrl
    chroma_token_env: str
    chroma_timeout_s: PositiveFloat
    embedding_model: Name
    embedding_api_base: OptionalHttpUrl
    chunk_tokens: Annotated[int, Meta(ge=32, le=256)]
    chunk_overlap_tokens: Annotated[int, Meta(ge=0)]
    max_age_days: PositiveFloat
    top_k: Annotated[int, Meta(ge=1, le=50)]
    context_share: Annotated[float, Meta(gt=0.0, le=1.0)]
    shared_collections: list[str]
    grants: dict[str, list[str]]
    max_document_bytes: Annotated[int, Meta(ge=1024)] = 10 * 1024 * 1024
    max_documents: Positive = 100
    embedding_threads: Annotated[int, Meta(ge=1, le=64)] = 2
    extract_timeout_s: PositiveFloat = 60.0  # an uploaded PDF's reader child is killed then
    max_pdf_pages: Positive = 1000  # a PDF with more is refused before a page is read
    upload_workers: Annotated[int, Meta(ge=1, le=64)] = 2  # uploads at once, all users
    upload_queue_s: PositiveFloat = 30.0  # an upload waiting longer for its turn: 503
    max_uploads_per_user: Annotated[int, Meta(ge=1, le=1024)] = 4  # open at once; more: 429

    def allowed(self, user_id: str) -> list[str]:
        """The collections `user_id` may search, their own first."""
        own = own_collection(user_id)
        granted = [name for name, users in self.grants.items() if user_id in users]
        return list(dict.fromkeys([own, *self.shared_collections, *granted]))


# Names stored as they are: lowercase letters, digits and inner dashes, 3-63 chars.
_PLAIN = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_SLUG_CHARS = 40


def stored_collection_name(name: str) -> str:
    """The stored name of collection `name`: one-to-one, so two names never share
    documents, and within Chroma's rules (3-512 chars of [A-Za-z0-9._-], alphanumeric
    at both ends) and a case-insensitive file system's (the keyword index's folder).

    A plain name (lowercase letters, digits, inner dashes) is stored as it is. Any
    other gets a readable slug, "_", and 24 hex digits of the SHA-256 of its exact
    text: plain names have no "_", so they never meet these, and `acme:bob`, `acme-bob`,
    `acme.bob` and `Acme-Bob` are four collections."""
    if _PLAIN.match(name):
        return name
    if not name:
        raise ValueError("an empty name cannot name a collection")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:_SLUG_CHARS].strip("-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"{slug or 'c'}_{digest}"


class Control(_Section, frozen=True):
    tombstone_ttl_s: Annotated[float, Meta(ge=0.0)]


HostName = Annotated[str, Meta(pattern=_HOST_NAME, max_length=253)]


class Limits(_Section, frozen=True):
    max_message_chars: Positive
    max_request_bytes: Annotated[int, Meta(ge=1024)]
    max_attachment_bytes: Positive = 512 * 1024
    image_url_hosts: list[HostName] = []
    # Each tools[].parameters and responseFormat.schema (contract 2.1): its JSON, its depth
    # and its JSON with every $ref expanded. The depth's cap keeps the measuring walk's
    # recursion far from Python's limit.
    max_schema_bytes: Positive = 65_536
    max_schema_depth: Annotated[int, Meta(ge=1, le=128)] = 32
    max_schema_expanded_bytes: Positive = 262_144
    # What one answer's tool calls may hold, as the vendor streams them: calls, and
    # characters of their ids, names and arguments together.
    max_tool_calls: Positive = 64
    max_tool_call_chars: Positive = 1_048_576


class Shutdown(_Section, frozen=True):
    grace_s: Annotated[float, Meta(ge=0.0)]


class Health(_Section, frozen=True):
    port: Port


class Log(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"]
    format: Literal["json", "text"]
    content: bool  # may debug lines show prompts and answers? never in production


class Otel(_Section, frozen=True):
    """OpenTelemetry: traces and metrics in the GenAI conventions, over OTLP/HTTP."""

    endpoint: OptionalHttpUrl = ""  # the collector's base URL (…:4318); empty: off
    capture_content: bool = False  # prompts and answers on the model-call span
    export_interval_s: PositiveFloat = 30.0  # how often metrics are sent


class Limit(_Section, frozen=True):
    """One user's or tenant's limits; 0 means no limit."""

    # Finite: the ledger's numeric column holds no infinity (and an infinite budget is
    # written 0, no limit). msgspec says which key is out of range.
    usd: Annotated[float, Meta(ge=0.0, le=1e12)] = 0.0
    rpm: Annotated[int, Meta(ge=0, le=10**12)] = 0
    tpm: Annotated[int, Meta(ge=0, le=10**12)] = 0


class Tenant(Limit, frozen=True):
    users: list[str] = []


class Budgets(_Section, frozen=True):
    period: Literal["day", "month"]
    user: Limit  # every user's default
    users: dict[str, Limit]  # per-user overrides (replace the default)
    tenants: dict[str, Tenant]  # shared limits for a group of users, on top of their own

    def for_user(self, user_id: str) -> list[tuple[str, Limit]]:
        """The limits a job of `user_id` must fit: (scope, limit), the user's first."""
        scopes = [(f"user:{user_id}", self.users.get(user_id, self.user))]
        scopes += [(f"tenant:{name}", t) for name, t in sorted(self.tenants.items())
                   if user_id in t.users]
        return scopes


class Gateway(_Section, frozen=True):
    """The reference SSE relay (bin/chat-actors gateway; contract 7)."""

    host: Name
    port: Port
    jwt_algorithm: Literal["HS256", "RS256"]
    jwt_secret_env: str
    jwt_public_key_file: str
    jwt_audience: str
    jwt_issuer: str
    user_claim: Name
    heartbeat_s: PositiveFloat
    page: bool
    idempotency_s: Positive
    readers: Annotated[int, Meta(ge=1, le=1024)]
    stream_reads: Literal["auto", "notified", "blocking"]
    stream_wait_s: PositiveFloat
    dev_signin: bool
    max_streams_per_user: Annotated[int, Meta(ge=1, le=100_000)] = 32
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 2 * 1024 * 1024
    body_timeout_s: PositiveFloat = 10.0
    produce_timeout_s: PositiveFloat = 10.0
    # Browser origins allowed to call the API (CORS), each scheme://host[:port], or "*";
    # empty: no CORS headers at all
    cors_origins: Annotated[list[Annotated[str, Meta(
        pattern=r"^(\*|https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?)$")]], Meta(max_length=256)] = []


class Config(_Section, frozen=True):
    kafka: Kafka
    redis: Redis
    stream: Stream
    postgres: Postgres
    llm: Llm
    jobs: Jobs
    rag: Rag
    control: Control
    limits: Limits
    shutdown: Shutdown
    health: Health
    log: Log
    budgets: Budgets
    gateway: Gateway
    otel: Otel = Otel()

    def alias(self, name: str | None) -> tuple[str, ModelAlias]:
        name = name or self.llm.default_model
        return name, self.llm.models[name]

    def decode_request(self, raw: bytes | None) -> ChatRequest:
        """One `chat.request` value checked against this config's aliases and limits, or
        BadInput: the one rule of the worker's intake and the gateway."""
        limits = self.limits
        return decode_request(raw, model_aliases=frozenset(self.llm.models),
                              max_message_chars=limits.max_message_chars,
                              max_request_bytes=limits.max_request_bytes,
                              max_attachment_bytes=limits.max_attachment_bytes,
                              image_url_hosts=limits.image_url_hosts,
                              max_schema_bytes=limits.max_schema_bytes,
                              max_schema_depth=limits.max_schema_depth,
                              max_schema_expanded_bytes=limits.max_schema_expanded_bytes)

    def job_keys(self, job_id: str) -> JobKeys:
        return job_keys(self.stream.key_template, job_id, cluster=self.redis.cluster)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], cast(Mapping[str, Any], value))
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _env_value(text: str) -> Any:
    # Lists and tables are written as TOML (`["a", "b"]`); scalars stay strings
    # and msgspec's lax mode turns "120" into 120 where the key is a number.
    if text.lstrip().startswith(("[", "{")):
        try:
            return tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            pass
    return text


def _env_overlay(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    overlay: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node = overlay
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name} conflicts with another one")
            node = cast(dict[str, Any], child)
        node[path[-1]] = _env_value(text)
        origins["$." + ".".join(path)] = f"environment variable {name}"
    return overlay, origins


def _origin(path: str, origins: dict[str, str], file: Path | None) -> str:
    for key, origin in origins.items():
        if path == key or path.startswith((key + ".", key + "[")) or key.startswith(path + "."):
            return origin
    return f"config file {file}" if file else f"config file {DEFAULT_FILE}"


def load_config(file: Path | str | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config: default.toml < `file` < CHAT_ACTORS__* environment variables."""
    environ = os.environ if environ is None else environ
    raw = _read_toml(DEFAULT_FILE)
    file = Path(file) if file is not None else None
    if file is not None:
        raw = _merge(raw, _read_toml(file))
    overlay, origins = _env_overlay(environ)
    raw = _merge(raw, overlay)
    # Each model alias first, so an error names the alias (msgspec says `models[...]`).
    llm: Any = raw.get("llm")
    models: Any = cast(dict[str, Any], llm).get("models") if isinstance(llm, dict) else None
    if isinstance(models, dict):  # anything else: the whole-config check names it
        for alias, table in cast(dict[str, Any], models).items():
            _convert(table, ModelAlias, f"$.llm.models.{alias}", origins, file)
    config = _convert(raw, Config, "$", origins, file)
    _check_models(config)
    return config


def _convert(raw: Any, kind: type[T], prefix: str, origins: dict[str, str],
             file: Path | None) -> T:
    try:
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        rule, _, where = str(exc).rpartition(" - at ")
        where = prefix + where.strip("`").removeprefix("$")
        rule = rule or str(exc)
        for pattern, meaning in _PATTERN_RULES.items():
            if f"regex {pattern!r}" in rule:
                rule = meaning
        if re.search(r"kafka\.(consumer|producer)\[", where) and "got `object`" in rule:
            rule += ('; librdkafka property names have dots, which TOML reads as tables: '
                     'quote the name ("max.poll.interval.ms" = 60000)')
        raise ConfigError(
            f"{where.removeprefix('$.') or 'config'}: {rule} (from {_origin(where, origins, file)})"
        ) from None


def _check_models(config: Config) -> None:
    models = config.llm.models
    if config.llm.default_model not in models:
        raise ConfigError(
            f"llm.default_model: {config.llm.default_model!r} is not a table under llm.models "
            f"(defined: {', '.join(sorted(models)) or 'none'})"
        )
    for alias, spec in models.items():
        for fallback in spec.fallbacks:
            if fallback not in models:
                raise ConfigError(f"llm.models.{alias}.fallbacks: unknown alias {fallback!r}")
            if fallback == alias:
                raise ConfigError(f"llm.models.{alias}.fallbacks: an alias cannot fall back to itself")
        if reserved := sorted(EXTRA_RESERVED & spec.extra_params.keys()):
            raise ConfigError(
                f"llm.models.{alias}.extra_params: {', '.join(reserved)} "
                f"{'is' if len(reserved) == 1 else 'are'} set by the worker itself (from the "
                "request and the alias's own keys); extra_params only adds what it does not set")
        if spec.max_tokens >= spec.context_window:
            raise ConfigError(
                f"llm.models.{alias}.max_tokens ({spec.max_tokens}) must be smaller than "
                f"context_window ({spec.context_window})"
            )
    for role in ("producer", "consumer"):
        for key in getattr(config.kafka, role):
            if key.lower() in _KAFKA_SECRETS:
                raise ConfigError(
                    f"kafka.{role}.{key}: a secret does not go in the config; set "
                    + (f"${config.kafka.sasl_password_env} (kafka.sasl_password_env)"
                       if key.lower() == "sasl.password" else "it through a file librdkafka reads"))
    if config.rag.chunk_overlap_tokens >= config.rag.chunk_tokens:
        raise ConfigError("rag.chunk_overlap_tokens must be smaller than rag.chunk_tokens")
    # A user's uploads go to `user-<id>`: shared or granted, it would be one user's to
    # write and others' to read.
    for key, names in (("rag.shared_collections", config.rag.shared_collections),
                       ("rag.grants", list(config.rag.grants))):
        for name in names:
            if name.startswith(OWN_COLLECTION):
                raise ConfigError(
                    f"{key}: {name!r} is the own collection of user "
                    f"{name.removeprefix(OWN_COLLECTION)!r} (their uploads go there): it cannot "
                    f"be shared or granted; name a collection that does not start with "
                    f"{OWN_COLLECTION!r}")
    if "{job_id}" not in config.stream.key_template and "{" in config.stream.key_template:
        raise ConfigError(
            "stream.key_template: the only placeholder allowed is {job_id}"
        )
    if config.redis.sentinel() and config.redis.cluster:
        raise ConfigError("redis.cluster: a Redis Cluster fails over by itself: it is not "
                          "reached through Sentinel (redis.url is a redis+sentinel:// URL)")
    if config.redis.cluster and "{job_id}" not in config.stream.key_template:
        raise ConfigError(
            "stream.key_template: with redis.cluster = true it must hold {job_id}: a shared "
            f"stream ({config.stream.key_template!r}) would put every job in one slot"
        )


# librdkafka settings that hold a secret: refused in the config files.
_KAFKA_SECRETS = {"sasl.password", "ssl.key.password", "ssl.keystore.password",
                  "sasl.oauthbearer.client.secret", "ssl.key.pem"}


def secret(env_name: str | None) -> str | None:
    """The secret in environment variable `env_name`, without surrounding whitespace
    (a Kubernetes secret made with `echo` ends in a newline); None when unset or empty."""
    if not env_name:
        return None
    return os.environ.get(env_name, "").strip() or None


def secret_variables(config: Config) -> dict[str, str]:
    """The environment variables holding secrets, by the config key that names each."""
    names = {f"llm.models.{alias}.api_key_env": spec.api_key_env
             for alias, spec in config.llm.models.items() if spec.api_key_env}
    if config.redis.password_env:
        names["redis.password_env"] = config.redis.password_env
    if config.redis.sentinel_password_env:
        names["redis.sentinel_password_env"] = config.redis.sentinel_password_env
    if config.gateway.jwt_secret_env:
        names["gateway.jwt_secret_env"] = config.gateway.jwt_secret_env
    if config.rag.chroma_token_env:
        names["rag.chroma_token_env"] = config.rag.chroma_token_env
    if config.kafka.sasl_password_env:
        names["kafka.sasl_password_env"] = config.kafka.sasl_password_env
    return names


def secret_problems(config: Config) -> list[str]:
    """Secrets the config points at that cannot be right: whitespace inside a key."""
    problems: list[str] = []
    for key, env_name in sorted(secret_variables(config).items()):
        value = secret(env_name)
        if value is not None and any(c.isspace() or not c.isprintable() for c in value):
            problems.append(f"{key}: the value of ${env_name} holds whitespace or control "
                            "characters inside it (only surrounding whitespace is removed)")
    return problems
