"""Config precedence (default < file < env) and clear errors for bad values."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from config import ConfigError, load_config
from tests.helpers import ROOT


def test_file_overrides_default_and_env_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[jobs]\ntimeout_s = 60\nmax_in_flight = 8\n'
                    '[kafka]\nbootstrap_servers = "file:9092"\n')
    assert load_config(environ={}).jobs.timeout_s == 120  # default.toml
    from_file = load_config(path, environ={})
    assert (from_file.jobs.timeout_s, from_file.jobs.max_in_flight) == (60, 8)
    both = load_config(path, environ={"CHAT_ACTORS__JOBS__TIMEOUT_S": "5",
                                      "CHAT_ACTORS__KAFKA__BOOTSTRAP_SERVERS": "10.0.0.5:9092",
                                      "CHAT_ACTORS__LLM__MODELS__LOCAL__FALLBACKS": "[]",
                                      "UNRELATED": "x"})
    assert both.jobs.timeout_s == 5 and both.jobs.max_in_flight == 8
    assert both.kafka.bootstrap_servers == "10.0.0.5:9092"


def test_env_can_define_a_new_model_alias():
    config = load_config(environ={"CHAT_ACTORS__LLM__MODELS__VENDOR__MODEL": "openai/gpt-4o-mini",
                                  "CHAT_ACTORS__LLM__DEFAULT_MODEL": "vendor"})
    assert config.alias(None)[1].model == "openai/gpt-4o-mini"


@pytest.mark.parametrize(("environ", "message"), [
    ({"CHAT_ACTORS__JOBS__TIMEOUT_S": "soon"},
     "jobs.timeout_s: Expected `float`, got `str` (from environment variable "
     "CHAT_ACTORS__JOBS__TIMEOUT_S)"),
    ({"CHAT_ACTORS__JOBS__MAX_IN_FLIGHT": "0"}, "jobs.max_in_flight: Expected `int` >= 1"),
    ({"CHAT_ACTORS__JOBS__TIMEOUTS": "1"}, "jobs: Object contains unknown field `timeouts`"),
    ({"CHAT_ACTORS__LLM__DEFAULT_MODEL": "nope"},
     "llm.default_model: 'nope' is not a table under llm.models"),
    ({"CHAT_ACTORS__LLM__MODELS__LOCAL__FALLBACKS": '["ghost"]'},
     "llm.models.local.fallbacks: unknown alias 'ghost'"),
    ({"CHAT_ACTORS__REDIS__URL": "http://x"},
     "redis.url: must be a redis://, rediss://, unix:// or redis+sentinel:// URL"),
    # Limits are finite: the ledger cannot hold an infinity (no limit is written 0).
    ({"CHAT_ACTORS__BUDGETS__USER__USD": "inf"}, "budgets.user.usd: Expected `float` <="),
    ({"CHAT_ACTORS__JOBS__SESSION_QUEUE_MAX": "0"}, "jobs.session_queue_max: Expected `int` >= 1"),
    # drop_params takes a request's parameter names, not the vendor's.
    ({"CHAT_ACTORS__LLM__MODELS__LOCAL__DROP_PARAMS": '["top_p"]'},
     "llm.models.local.drop_params[0]: Invalid enum value 'top_p'"),
])
def test_bad_values_name_the_key_and_the_rule(environ, message):
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert message in str(info.value)


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[jobs\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config(path, environ={})
    path.write_text("[shutdown]\ngrace_s = -1\n")
    expected = r"shutdown.grace_s: Expected `float` >= 0.0 \(from config file .*broken.toml\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(path, environ={})


def test_an_unquoted_librdkafka_property_is_explained(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[kafka.consumer]\nmax.poll.interval.ms = 60000\n")
    with pytest.raises(ConfigError, match=r'kafka.consumer\[...\]: .*quote the name '
                                          r'\("max.poll.interval.ms" = 60000\)'):
        load_config(path, environ={})
    path.write_text('[kafka.consumer]\n"max.poll.interval.ms" = 60000\n')
    assert load_config(path, environ={}).kafka.consumer == {"max.poll.interval.ms": 60000}


def test_run_refuses_a_bad_config_with_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", str(tmp_path / "missing.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"chat-actors: config error: config file {tmp_path / 'missing.toml'} does not exist")


def test_the_shipped_deployment_config_is_valid():
    """deploy/worker.toml (mounted by docker-compose.yml) must load as the worker would."""
    config = load_config(ROOT / "deploy" / "worker.toml", environ={})
    assert config.kafka.bootstrap_servers == "kafka:9092"
    assert config.llm.models[config.llm.default_model].api_key_env == "OPENAI_API_KEY"
    assert config.budgets.for_user("anyone")[0][1].usd == 5.0


@pytest.mark.parametrize(("key", "value"), [
    ("LLM__MODELS__LOCAL__API_BASE", "localhost:8000/v1"),  # no scheme: failed at the first call
    ("LLM__MODELS__LOCAL__API_BASE", "ftp://host/v1"),
    ("RAG__CHROMA_URL", "chroma:8000"),
    ("RAG__EMBEDDING_API_BASE", "http:// spaced"),
])
def test_endpoints_must_be_http_urls(key, value):
    with pytest.raises(ConfigError, match=key.lower().replace("__", ".")):
        load_config(environ={f"CHAT_ACTORS__{key}": value})


def test_secrets_lose_surrounding_whitespace_and_whitespace_inside_is_refused(monkeypatch):
    from config import secret, secret_problems

    monkeypatch.setenv("KEY_WITH_NEWLINE", "sk-abc\n")
    monkeypatch.setenv("KEY_BROKEN", "sk-a bc")
    assert secret("KEY_WITH_NEWLINE") == "sk-abc" and secret("UNSET_KEY") is None
    config = load_config(environ={
        "CHAT_ACTORS__LLM__MODELS__LOCAL__API_KEY_ENV": "KEY_WITH_NEWLINE",
        "CHAT_ACTORS__LLM__MODELS__OTHER__MODEL": "openai/x",
        "CHAT_ACTORS__LLM__MODELS__OTHER__API_KEY_ENV": "KEY_BROKEN"})
    assert secret_problems(config) == [
        "llm.models.other.api_key_env: the value of $KEY_BROKEN holds whitespace or control "
        "characters inside it (only surrounding whitespace is removed)"]


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database():
    config = load_config(environ={"CHAT_ACTORS__REDIS__URL":
                                  "redis+sentinel://ops@s1:26380,s2,[::1]:7/chat%2Dmain/3"})
    found = config.redis.sentinel()
    assert found is not None
    assert found.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 7))
    assert (found.service, found.db, found.username) == ("chat-main", 3, "ops")
    assert load_config(environ={}).redis.sentinel() is None


@pytest.mark.parametrize(("url", "says"), [
    ("redis+sentinel://", "a sentinel without a host"),
    ("redis+sentinel://s1,,s2/chat", "a sentinel without a host"),
    ("redis+sentinel://s1:26379", "no service name"),
    ("redis+sentinel://s1:26379/", "no service name"),
    ("redis+sentinel://s1:0/chat", "port '0' is not 1-65535"),
    ("redis+sentinel://s1:65536/chat", "port '65536' is not 1-65535"),
    ("redis+sentinel://s1:2637x/chat", "port '2637x' is not 1-65535"),
    ("redis+sentinel://::1/chat", "an IPv6 address goes in brackets"),
    ("redis+sentinel://[not-v6]:1/chat", "in brackets is not an IPv6 address"),
    ("redis+sentinel://[::1]x/chat", "text after the bracketed address"),
    ("redis+sentinel://s\u00e9/chat", "is not a host name or address"),
    ("redis+sentinel://s1/chat/one", "database 'one' is not a number"),
    ("redis+sentinel://s1/chat/0/extra", "is not a number"),
    ("redis+sentinel://s1/chat/\u0663", "is not a number"),  # an Arabic-Indic digit
    ("redis+sentinel://s1/chat?ssl=true", "takes no query or fragment"),
    ("redis+sentinel://s1 /chat", "white space"),
    ("redis+sentinel://:hunter2@s1/chat", "a password does not go in the URL"),
    ("rediss+sentinel://s1/chat", "must be a redis://, rediss://, unix:// or redis+sentinel://"),
])
def test_a_malformed_sentinel_url_is_refused_saying_what_is_wrong(url, says):
    with pytest.raises(ConfigError, match="^redis.url: ") as refused:
        load_config(environ={"CHAT_ACTORS__REDIS__URL": url})
    assert says in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_sentinel_and_cluster_together_are_refused():
    with pytest.raises(ConfigError, match="redis.cluster: a Redis Cluster fails over by itself"):
        load_config(environ={"CHAT_ACTORS__REDIS__URL": "redis+sentinel://s1/chat",
                             "CHAT_ACTORS__REDIS__CLUSTER": "true"})


@pytest.mark.parametrize("key", ["sasl.password", "SASL.PASSWORD", "ssl.key.password"])
def test_a_kafka_secret_in_the_config_is_refused(tmp_path, key):
    path = tmp_path / "c.toml"
    path.write_text(f'[kafka.consumer]\n"{key}" = "hunter2-literal"\n')
    with pytest.raises(ConfigError, match=f"kafka.consumer.{re.escape(key)}: a secret") as refused:
        load_config(path, environ={})
    assert "hunter2" not in str(refused.value)
    if key.lower() == "sasl.password":
        assert "$CHAT_ACTORS_KAFKA_PASSWORD (kafka.sasl_password_env)" in str(refused.value)


def test_the_sasl_password_reaches_every_kafka_client_from_the_environment_only(monkeypatch):
    from actors.logs import scrubber, secrets_from

    managed = {"CHAT_ACTORS__KAFKA__PRODUCER": '{"security.protocol" = "SASL_SSL", '
                                                '"sasl.mechanisms" = "SCRAM-SHA-512", '
                                                '"sasl.username" = "chat"}',
               "CHAT_ACTORS__KAFKA__CONSUMER": '{"security.protocol" = "SASL_SSL", '
                                                '"sasl.mechanisms" = "SCRAM-SHA-512", '
                                                '"sasl.username" = "chat"}'}
    config = load_config(environ=managed)
    assert "sasl.password" not in config.kafka.client("producer")  # unset: nothing added
    monkeypatch.setenv("CHAT_ACTORS_KAFKA_PASSWORD", "  kafka-pw-7f3e  ")
    for role in ("producer", "consumer"):
        settings = config.kafka.client(role)
        assert settings["sasl.password"] == "kafka-pw-7f3e"
        assert settings["sasl.username"] == "chat"
    # ...and never leaves in a log line.
    scrub = scrubber(secrets_from(config))
    assert "kafka-pw-7f3e" not in scrub("auth failed for chat/kafka-pw-7f3e")


async def test_a_key_with_whitespace_inside_stops_the_start_with_one_clear_line(monkeypatch):
    from actors.supervisor import StartupError, run_worker

    monkeypatch.setenv("KEY_BROKEN", "sk-a\nbc")
    config = load_config(environ={"CHAT_ACTORS__LLM__MODELS__LOCAL__API_KEY_ENV": "KEY_BROKEN"})
    with pytest.raises(StartupError, match=r"llm.models.local.api_key_env: the value of "
                                           r"\$KEY_BROKEN holds whitespace"):
        await run_worker(config)


def test_run_with_postgres_unreachable_names_it_in_one_line(tmp_path):
    # It used to print only "cannot start: Exceptions from Trio nursery (1 sub-exception)".
    config = tmp_path / "pg-down.toml"
    config.write_text('[postgres]\ndsn = "postgresql://postgres:pw-secret@127.0.0.1:1/db"\n'
                      "[health]\nport = 0\n")
    result = subprocess.run([sys.executable, "-m", "tools.cli", "run", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    line = next(line for line in result.stderr.splitlines() if "cannot start" in line)
    assert line.startswith("chat-actors: cannot start: postgres at "
                           "postgresql://postgres:***@127.0.0.1:1/db is unreachable: ")
    assert "Connection refused" in line and "pw-secret" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("environ", "key"), [
    ({"CHAT_ACTORS__RAG__SHARED_COLLECTIONS": '["docs", "user-bob"]'}, "rag.shared_collections"),
    ({"CHAT_ACTORS__RAG__GRANTS": '{"user-bob" = ["alice"]}'}, "rag.grants"),
])
def test_a_users_own_collection_cannot_be_shared_or_granted(environ, key):
    # Bob's uploads go to user-bob: shared, it would be his to write and others' to read.
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert str(info.value).startswith(f"{key}: 'user-bob' is the own collection of user 'bob' "
                                      "(their uploads go there): it cannot be shared or granted")
    # A name merely like it is another collection (contract 5: names are one-to-one).
    assert load_config(environ={"CHAT_ACTORS__RAG__SHARED_COLLECTIONS": '["User-Bob"]'})


@pytest.mark.parametrize("extra", ["{ max_tokens = 5 }", '{ model = "other", stream = false }',
                                   "{ messages = [] }", '{ tool_choice = "none" }'])
def test_extra_params_may_not_replace_what_the_worker_sets(extra):
    with pytest.raises(ConfigError, match=r"^llm\.models\.local\.extra_params: .* set by the "
                                          r"worker itself"):
        load_config(environ={"CHAT_ACTORS__LLM__MODELS__LOCAL__EXTRA_PARAMS": extra})


def test_extra_params_of_any_shape_are_kept_as_they_are():
    value = {"thinking": {"type": "enabled", "budget_tokens": 2048, "display": "summarized"},
             "top_k": 40, "safe_prompt": True}
    config = load_config(environ={"CHAT_ACTORS__LLM__MODELS__LOCAL__EXTRA_PARAMS": (
        '{ thinking = { type = "enabled", budget_tokens = 2048, display = "summarized" }, '
        "top_k = 40, safe_prompt = true }")})
    assert config.llm.models["local"].extra_params == value
