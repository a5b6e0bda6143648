"""Configuration: durations, secrets, unknown keys, environment overrides, key paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.admin.auth import TokenTable
from relay.config import load_config, parse_config
from relay.config.values import parse_duration, resolve_secret
from relay.errors import ConfigError
from relay.store.client import redact_url
from tests.support.common import config_dict
from tests.support.process import write_toml


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        (" 1.5h ", 5400.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["7 weeks", "-5s", "s", "", True, None, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def problems(data: dict[str, object], env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env=env or {})
    return dict(e.value.problems)


def test_unknown_keys_are_errors_with_their_path() -> None:
    data = config_dict()
    data["server"]["listn"] = "x"
    data["tenants"][0]["sinks"][0]["retries"] = 3
    found = problems(data)
    assert found["server.listn"] == "unknown key"
    assert found["tenants[0].sinks[0].retries"] == "unknown key"


def test_every_problem_is_listed_at_once() -> None:
    data = config_dict()
    data["relay"]["dedupe_ttl"] = "forever"
    data["tenants"][0]["slug"] = "Not A Slug"
    data["tenants"][1]["sinks"][0]["url"] = "ftp://nope"
    found = problems(data)
    assert set(found) >= {"relay.dedupe_ttl", "tenants[0].slug", "tenants[1].sinks[0].url"}


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hook.secret").write_text("from-a-file\n")
    monkeypatch.setenv("CHERT_TEST_SECRET", "from-env")
    assert resolve_secret("file:hook.secret", tmp_path).get() == "from-a-file"
    assert resolve_secret(f"file:{tmp_path / 'hook.secret'}").get() == "from-a-file"
    env_secret = resolve_secret("env:CHERT_TEST_SECRET")
    assert env_secret.get() == "from-env"
    assert "from-env" not in repr(env_secret)
    assert resolve_secret("literal-value").is_literal
    with pytest.raises(ValueError, match="CHERT_TEST_MISSING is not set"):
        resolve_secret("env:CHERT_TEST_MISSING")
    with pytest.raises(ValueError, match="cannot read secret file"):
        resolve_secret("file:missing.secret", tmp_path)


def test_literal_secrets_are_warned_about_and_never_shown() -> None:
    config = parse_config(config_dict(), env={})
    warnings = config.warnings()
    assert any("tenants[0].webhook_secrets[0] is a literal secret" in w for w in warnings)
    assert not any(config.tenants[0].webhook_secrets[0].get() in w for w in warnings)
    assert config.tenants[0].webhook_secrets[0].get() not in repr(config)


def test_environment_overrides_top_level_settings() -> None:
    env = {
        "CHERT_RELAY__SERVER__MAX_BODY_BYTES": "2048",
        "CHERT_RELAY__REDIS__URL": "redis://10.1.2.3:6380/2",
        "CHERT_RELAY__RELAY__DEDUPE_TTL": "3d",
        "UNRELATED": "x",
    }
    config = parse_config(config_dict(), env=env)
    assert config.server.max_body_bytes == 2048
    assert config.redis.url is not None
    assert config.redis.url.get() == "redis://10.1.2.3:6380/2"
    assert config.relay.dedupe_ttl == 3 * 86400
    found = problems(config_dict(), env={"CHERT_RELAY__SERVER__NOPE": "1"})
    assert found["server.nope"] == "unknown key"


def test_an_override_names_a_setting_of_a_top_level_section() -> None:
    # A misspelt section is refused as a misspelt key is, not ignored.
    found = problems(config_dict(), env={"CHERT_RELAY__NOPE__X": "1"})
    assert found == {"nope": "unknown key"}
    # The tenants are a list, not a section: the environment cannot reach into them.
    found = problems(config_dict(), env={"CHERT_RELAY__TENANTS__SLUG": "x"})
    assert found == {"tenants": "cannot override CHERT_RELAY__TENANTS__…"}
    # Nor replace them whole: a name without a key is no override.
    assert parse_config(config_dict(), env={"CHERT_RELAY__TENANTS": "[]"}).tenants


def test_sink_filters_and_unique_names() -> None:
    config = parse_config(config_dict(), env={})
    crm, everything = config.tenants[0].sinks
    assert crm.matches("message.received")
    assert not crm.matches("reaction.added")
    assert everything.matches("anything.at.all")
    data = config_dict()
    data["tenants"][0]["sinks"][1]["name"] = "crm"
    assert "sink names must be unique" in problems(data)["tenants[0].sinks"]


def test_a_tenant_must_have_a_way_in() -> None:
    data = config_dict()
    data["tenants"][0]["webhook_secrets"] = []
    assert "could receive nothing" in problems(data)["tenants[0]"]
    data["tenants"][0]["poll"] = {"mode": "always"}
    assert "api.signing_secret is not set" in problems(data)["tenants[0]"]


def test_a_minimal_tenant_is_told_that_the_default_poll_mode_needs_api_credentials() -> None:
    data = config_dict()
    data["tenants"][0].pop("poll", None)
    data["tenants"][0].pop("api", None)
    said = problems(data)["tenants[0]"]
    assert "poll.mode is 'fallback' (the default" in said
    assert "poll.mode = 'off' for webhooks only" in said
    data["tenants"][0]["poll"] = {"mode": "off"}
    assert parse_config(data, env={}).tenants[0].poll.mode == "off"


def test_the_example_configuration_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "relay.example.toml"
    config = load_config(example, env={})
    assert config.redis.url is None  # the embedded default
    assert config.tenants[0].slug == "acme-7a3f"


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


@pytest.mark.parametrize("secret", ["abc", "whsec_not-base64!!", "whsec_c2hvcnQ="])
def test_sink_secrets_must_be_standard_webhooks_keys(secret: str) -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][0]["secret"] = secret
    assert "tenants[0].sinks[0].secret" in problems(data)


def test_values_that_validate_must_also_work() -> None:
    data = config_dict(
        server={"ingest_timeout": 0, "body_timeout": float("nan")},
        relay={"dedupe_ttl": 1e300},
        redis={"url": "localhost:6379"},
    )
    data["tenants"][0]["sinks"][0]["max_age"] = float("inf")
    data["tenants"][0]["signature_tolerance"] = 0.5
    found = problems(data)
    assert "greater than or equal to 0.1" in found["server.ingest_timeout"]
    assert found["server.body_timeout"] == "a duration must be a number"
    assert found["relay.dedupe_ttl"] == "a duration cannot be longer than 10 years"
    assert found["tenants[0].sinks[0].max_age"] == "a duration cannot be longer than 10 years"
    assert "greater than or equal to 1" in found["tenants[0].signature_tolerance"]
    assert found["redis.url"] == "a Redis URL starts with redis://, rediss:// or unix://"


def test_a_bad_url_is_not_echoed_in_the_error() -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][0]["url"] = "https//user:PASSWORD@hooks.example/T0/B0/xyz"
    found = problems(data)
    assert "PASSWORD" not in str(found)
    assert "not an http:// or https:// URL" in found["tenants[0].sinks[0].url"]
    data = config_dict(redis={"url": "redis//:PASSWORD@host:6379"})
    assert "PASSWORD" not in str(problems(data))


def test_redis_passwords_are_hidden_from_logs() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_an_environment_secret_of_digits_stays_a_string() -> None:
    env = {"CHERT_RELAY__ADMIN__TOKEN": "0x1234567890123456", "CHERT_RELAY__WORKER__MAX_JOBS": "7"}
    cfg = parse_config(config_dict(), env=env)
    assert cfg.admin.token is not None
    assert cfg.admin.token.get() == "0x1234567890123456"
    assert cfg.worker.max_jobs == 7  # other settings are still read as TOML values


def test_listeners_must_be_usable() -> None:
    found = problems(config_dict(server={"listen": "unix:"}))
    assert "needs a socket path" in found["server.listen"]
    found = problems(
        config_dict(server={"listen": "127.0.0.1:8080"}, admin={"listen": "127.0.0.1:8080"})
    )
    assert found["admin"] == "admin.listen is server.listen too (127.0.0.1:8080)"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://hooks.example:99999/x", "the URL's port is not a number from 0 to 65535"),
        ("http://hooks example/x", "a URL cannot contain spaces"),
        ("http:///x", "not an http:// or https:// URL (scheme://host/…)"),
    ],
)
def test_sink_urls_that_could_never_be_reached(url: str, problem: str) -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][0]["url"] = url
    assert problems(data)["tenants[0].sinks[0].url"] == problem


def test_redis_is_a_url_or_a_sentinel_deployment_not_both() -> None:
    def problems(redis: dict[str, Any]) -> dict[str, str]:
        try:
            parse_config(config_dict(redis=redis), env={})
        except ConfigError as e:
            return dict(e.problems)
        return {}

    ok = {"sentinels": ["10.0.0.1:26379", "10.0.0.2:26379"], "service_name": "relay"}
    assert problems(ok) == {}
    cfg = parse_config(config_dict(redis=ok), env={})
    assert cfg.redis.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    both = problems({**ok, "url": "redis://127.0.0.1:6379/0"})
    assert "set either url or sentinels" in both["redis"]
    assert "need service_name" in problems({"sentinels": ["h:1"]})["redis"]
    assert "is not 'host:port'" in problems({**ok, "sentinels": ["h"]})["redis.sentinels[0]"]
    assert "a url carries its own" in problems({"password": "x"})["redis"]
    assert "redis.min_replica_acks" in problems({"min_replica_acks": -1})


def test_a_sink_with_url_credentials_and_an_authorization_header_is_refused() -> None:
    """aiohttp refuses to send a request with both: every delivery would fail."""
    data = config_dict()
    sink = data["tenants"][0]["sinks"][0]
    sink.update(url="https://relay:pw-1234@hooks.example/x", headers={"authorization": "Bearer t"})
    data["tenants"][1]["sinks"][0]["timeout"] = "soon"  # reported in the same run
    found = problems(data)
    assert "credentials in the URL" in found["tenants[0].sinks[0].headers"]
    assert "pw-1234" not in found["tenants[0].sinks[0].headers"]
    assert "tenants[1].sinks[0].timeout" in found
    sink["headers"] = {"X-Api-Key": "k"}  # URL credentials alone, or another header: fine
    parse_config(data | {"tenants": [data["tenants"][0]]}, env={})


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"X-Key": "a\r\nX-Injected: 1"}, "the value of header 'X-Key' holds a line break or NUL"),
        ({"Bad Name": "x"}, "'Bad Name' is not a header name"),
        ({"": "x"}, "'' is not a header name"),
    ],
)
def test_sink_headers_aiohttp_could_not_send_are_refused(
    headers: dict[str, str], problem: str
) -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][0]["headers"] = headers
    assert problems(data)["tenants[0].sinks[0].headers"] == problem


def test_an_unresolved_admin_token_fails_where_it_is_used(tmp_path: Path) -> None:
    data = config_dict()
    data["admin"] = {"token": "env:CHERT_RELAY_TEST_UNSET_ADMIN_TOKEN"}
    path = write_toml(tmp_path / "relay.toml", data)
    with pytest.raises(ConfigError, match=r"admin\.token"):
        load_config(path)
    config = load_config(path, admin_tokens=False)
    token = config.admin.token
    assert token is not None
    assert not token.resolved
    assert "unresolved" in repr(token)
    assert token != load_config(path, admin_tokens=False).admin.token  # equals no secret
    assert not any("admin.token" in w for w in config.warnings())
    with pytest.raises(ConfigError, match="CHERT_RELAY_TEST_UNSET_ADMIN_TOKEN is not set"):
        token.get()
    # The admin listener would read it: it fails closed, as a configuration problem.
    with pytest.raises(ConfigError):
        TokenTable(config)


def test_a_signature_tolerance_at_or_past_the_seen_marks_life_is_refused() -> None:
    data = config_dict()
    data["relay"] = {"dedupe_ttl": "1h"}
    data["tenants"][0]["signature_tolerance"] = "1h"
    said = problems(data)[""]
    assert "signature_tolerance (3600s) must be shorter than relay.dedupe_ttl" in said
    data["tenants"][0]["signature_tolerance"] = "30d"  # absurd whatever the seen mark
    data["relay"] = {"dedupe_ttl": "60d"}
    assert "tenants[0].signature_tolerance" in problems(data)
    data["tenants"][0]["signature_tolerance"] = "10m"
    assert parse_config(data, env={}).tenants[0].signature_tolerance == 600


def test_a_short_webhook_secret_is_warned_about_without_showing_it() -> None:
    data = config_dict()
    data["tenants"][0]["webhook_secrets"] = ["k3y"]
    warned = [w for w in parse_config(data, env={}).warnings() if "shorter than 16" in w]
    assert warned == [
        "tenants[0].webhook_secrets[0] is shorter than 16 bytes: a short HMAC key can be guessed"
    ]
    data["tenants"][0]["webhook_secrets"] = ["x" * 16]
    assert not [w for w in parse_config(data, env={}).warnings() if "shorter than" in w]


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://chert.internal/api/v1", True),
        ("http://10.0.0.7/api/v1", True),
        ("https://chert.internal/api/v1", False),
        ("http://127.0.0.1:8080/api/v1", False),  # the secret never leaves this machine
        ("http://[::1]:8080/api/v1", False),
        ("http://localhost:8080/api/v1", False),
    ],
)
def test_bearer_auth_over_plain_http_to_another_machine_is_refused(url: str, refused: bool) -> None:
    data = config_dict()
    data["tenants"][0]["api"] = {"base_url": url, "auth": "bearer", "signing_secret": "s" * 32}
    if refused:
        assert "sends the API secret in every request" in problems(data)["tenants[0].api"]
        data["tenants"][0]["api"]["insecure_bearer_over_http"] = True
        warned = parse_config(data, env={}).warnings()
        assert any("crosses the network readable" in w for w in warned)
    else:
        assert parse_config(data, env={}).tenants[0].api.auth == "bearer"


def broker_sink(**fields: Any) -> dict[str, Any]:
    data = config_dict()
    sink = {"name": "b", **fields}
    data["tenants"][0]["sinks"] = [sink]
    return data


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"url": "redis://10.0.0.7:6379/0", "stream": "chert-events"}, "redis-stream"),
        ({"url": "rediss://10.0.0.7/0", "stream": "s", "max_len": 1000}, "redis-stream"),
        ({"url": "nats://10.0.0.8:4222", "subject": "chert.events"}, "nats"),
        ({"url": "tls://10.0.0.8:4222", "subject": "chert.events", "kind": "nats"}, "nats"),
        (
            {"url": "amqps://user@10.0.0.9/vhost", "exchange": "chert", "routing_key": "events"},
            "amqp",
        ),
        ({"url": "amqp://10.0.0.9", "exchange": "", "routing_key": "a-queue"}, "amqp"),
        ({"url": "https://hooks.example/x"}, "http"),
    ],
)
def test_broker_sinks_take_their_kind_from_the_url(fields: dict[str, Any], kind: str) -> None:
    cfg = parse_config(broker_sink(**fields), env={})
    assert cfg.tenants[0].sinks[0].kind == kind


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            {"url": "nats://10.0.0.8:4222"},
            "a nats sink needs subject (the subject a JetStream stream captures)",
        ),
        ({"url": "redis://10.0.0.7"}, "a redis-stream sink needs stream (the stream's key)"),
        ({"url": "amqp://10.0.0.9", "routing_key": "k"}, "an amqp sink needs exchange"),
        ({"url": "amqp://10.0.0.9", "exchange": ""}, "the default exchange"),
        ({"url": "nats://h:4222", "subject": "chert.*"}, "without spaces or the wildcards"),
        ({"url": "nats://h:4222", "subject": "chert..events"}, "without spaces or the wildcards"),
        (
            {"url": "nats://h:4222", "subject": "a", "stream": "s"},
            "stream is for redis-stream sinks; this sink is nats",
        ),
        ({"url": "https://h/x", "subject": "a"}, "subject is for nats sinks; this sink is http"),
        (
            {"url": "https://h/x", "kind": "nats", "subject": "a"},
            "a nats sink's URL is nats:// or tls://",
        ),
        ({"url": "sqs://queue/x"}, "not an http:// or https:// URL"),
        ({"url": "amqp://h", "exchange": "bad name!"}, "an exchange name holds only"),
        ({"url": "https://h/x", "password": "env:P"}, "password is for broker sinks"),
    ],
)
def test_broker_sink_problems_are_named(
    fields: dict[str, Any], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P", "x")
    found = problems(broker_sink(**fields))
    assert any(problem in text for text in found.values()), found


def test_a_broker_url_with_a_password_is_warned_about_and_a_password_key_is_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MQ_PASSWORD", "s3cret-value")
    cfg = parse_config(broker_sink(url="amqp://relay:hunter22@mq/", exchange="x"), env={})
    assert any("url holds a password" in w for w in cfg.warnings())
    cfg = parse_config(
        broker_sink(url="amqp://relay@mq/", exchange="x", password="env:MQ_PASSWORD"), env={}
    )
    sink = cfg.tenants[0].sinks[0]
    assert sink.password is not None
    assert sink.password.get() == "s3cret-value"
    assert "s3cret-value" not in repr(sink)
    assert not any("password" in w for w in cfg.warnings())


def test_a_broker_kind_whose_extra_is_missing_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a)
    )
    found = problems(broker_sink(url="nats://h:4222", subject="a"))
    assert any("pip install 'chert-relay[nats]'" in text for text in found.values()), found


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [("50/s", 50.0), ("3000/m", 50.0), ("3000/min", 50.0), (" 2.5 / s ", 2.5), ("1/m", 1 / 60)],
)
def test_a_sink_rate_is_a_count_per_second_or_minute(rate: str, per_second: float) -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][0]["rate"] = rate
    cfg = parse_config(data, env={})
    assert cfg.tenants[0].sinks[0].rate == pytest.approx(per_second)
    assert cfg.tenants[0].sinks[1].rate is None  # no key: no limit


@pytest.mark.parametrize(
    ("rate", "problem"),
    [
        ("50", "is not a rate; use a string like '50/s' or '3000/m'"),
        (50, "is not a rate"),
        ("50/h", "is not a rate"),
        ("fast", "is not a rate"),
        ("0/s", "a rate must be more than 0"),
        ("-5/s", "a rate must be more than 0"),
        ("20000/s", "a rate cannot be more than 10000/s"),
        ("0.5/m", "a rate cannot be less than 1/m"),
    ],
)
def test_a_bad_sink_rate_is_named_by_its_key_path(rate: object, problem: str) -> None:
    data = config_dict()
    data["tenants"][0]["sinks"][1]["rate"] = rate
    found = problems(data)
    assert problem in found["tenants[0].sinks[1].rate"], found


def test_the_body_memory_budget_holds_two_bodies() -> None:
    data = config_dict(redis_url="redis://127.0.0.1:9/0")
    data["server"]["max_body_bytes"] = 8 * 1_048_576
    assert parse_config(data, env={}).server.body_memory == 64 * 1_048_576
    data["server"]["max_body_bytes"] = 48 * 1_048_576
    assert parse_config(data, env={}).server.body_memory == 96 * 1_048_576  # two of them
    data["server"]["max_body_memory"] = "64MiB"
    with pytest.raises(ConfigError, match=r"max_body_memory .* must be at least twice"):
        parse_config(data, env={})
