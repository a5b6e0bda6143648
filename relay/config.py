"""The relay's configuration: one TOML file, validated once into frozen models.

Unknown keys are errors (a misspelt setting must never be silently ignored).
Durations accept seconds or ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``.
Secrets are ``"env:NAME"``, ``"file:/path"`` or a literal (accepted, with a warning).
Environment variables ``CHERT_RELAY__<SECTION>__<KEY>`` override single settings of
the top-level sections (``CHERT_RELAY__REDIS__URL=redis://…``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.config_values import (
    Duration,
    HttpUrl,
    ListenField,
    Secret,
    SecretField,
    parse_listen,
)
from relay.errors import ConfigError
from relay.signing import standard_webhooks_key

ENV_PREFIX = "CHERT_RELAY__"
DEFAULT_CONFIG_PATHS = ("/etc/chert-relay/relay.toml",)

_SLUG_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class ServerConfig(_Section):
    listen: ListenField = Field(default_factory=lambda: parse_listen("127.0.0.1:8080"))
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    # longest a webhook waits on Redis before answering 503
    ingest_timeout: Annotated[Duration, Field(ge=0.1)] = 5.0
    # longest a webhook's body may take to arrive before answering 503; a request head
    # still arriving after it (checked every 5 s) closes its connection
    body_timeout: Annotated[Duration, Field(ge=0.1)] = 30.0
    shutdown_timeout: Duration = 10.0  # bound on in-flight requests at shutdown
    retry_after: int = Field(5, ge=1, le=3600)  # Retry-After sent with 503
    # a connection with nothing to answer is closed after this long (checked every 5 s)
    keepalive_timeout: Annotated[Duration, Field(ge=1)] = 75.0
    # open connections at most; past it a new one replaces the longest-idle, or gets 503
    max_connections: int = Field(1000, ge=1, le=1_000_000)


class AdminConfig(_Section):
    # `run` and `serve` listen here; `worker` on worker_listen, so that the roles can run
    # side by side on one host from one file (`--admin-listen` overrides either).
    listen: ListenField | None = Field(default_factory=lambda: parse_listen("127.0.0.1:9090"))
    worker_listen: ListenField | None = Field(
        default_factory=lambda: parse_listen("127.0.0.1:9091")
    )
    token: SecretField | None = None


class RedisConfig(_Section):
    url: SecretField | None = None  # absent: a private redis-server under state_dir
    key_prefix: str = Field("chert-relay", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    server_binary: str = "redis-server"
    connect_timeout: Duration = 5.0
    # At start-up, wait this long for a Redis that does not answer yet (a slow boot)
    # before giving up with exit code 69.
    startup_wait: Duration = 30.0
    require_aof: bool = False  # refuse (rather than warn) when AOF is off

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, v: Secret | None) -> Secret | None:
        if v is not None and urlsplit(v.get()).scheme not in ("redis", "rediss", "unix"):
            # Not the value itself: it may carry the password.
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        return v


class RelaySection(_Section):
    state_dir: Path = Path("/var/lib/chert-relay")
    dedupe_ttl: Duration = Field(7 * 86400.0, gt=0)


class WorkerConfig(_Section):
    max_jobs: int = Field(200, ge=1, le=10_000)
    poll_delay: Duration = 0.05
    shutdown_grace: Duration = 30.0  # running deliveries get this long after SIGTERM
    queue_read_limit: int | None = Field(None, ge=1)
    # Delivery retries: the wait before attempt n+1 is retry_backoff * 2**(n-1), capped at
    # retry_backoff_max, minus up to 25% jitter; a sink's Retry-After wins, up to
    # retry_after_max.
    retry_backoff: Duration = Field(1.0, gt=0)
    retry_backoff_max: Duration = Field(3600.0, gt=0)
    retry_after_max: Duration = Field(3600.0, gt=0)
    # Per-sink circuit breaker: opens after this many consecutive failed attempts, and
    # lets one probe through after breaker_cooldown.
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_cooldown: Duration = Field(30.0, gt=0)
    # A job whose sink is at its in-flight cap (sink.concurrency) waits about this long.
    busy_defer: Duration = Field(0.25, gt=0)


class ApiConfig(_Section):
    base_url: HttpUrl = "https://console.trychert.com/api/v1"
    auth: Literal["hmac", "bearer"] = "hmac"
    signing_secret: SecretField | None = None
    timeout: Duration = 30.0
    max_attempts: int = Field(4, ge=1, le=100)  # tries per call on retryable errors
    max_backoff: Duration = Field(60.0, gt=0)  # cap on one wait between tries


class PollConfig(_Section):
    mode: Literal["off", "fallback", "always", "sse"] = "fallback"
    interval: Duration = Field(10.0, gt=0)
    lapse_after: Duration = Field(300.0, gt=0)
    reconcile_every: Duration = Field(900.0, gt=0)
    overlap: Duration = 120.0
    page_size: int = Field(200, ge=1, le=200)
    # First poll of a tenant (no watermark yet) asks for now - max(overlap, this);
    # older history is what ``chert-relay backfill`` is for.
    initial_lookback: Duration = 0.0
    # A failed/pending row older than this that the relay never saw means webhooks lapsed.
    stale_after: Duration = 60.0
    auth_backoff: Duration = Field(300.0, gt=0)  # wait after Chert refuses our credentials
    lease_ttl: Duration = Field(30.0, gt=0)  # one poller per tenant across relays
    sse_idle_timeout: Duration = Field(30.0, gt=0)  # a stream silent this long is dead


class SinkConfig(_Section):
    name: str = Field(pattern=_SLUG_RE)
    url: HttpUrl
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    secret: SecretField | None = None
    timeout: Duration = Field(10.0, gt=0)
    max_attempts: int = Field(15, ge=1, le=1000)
    max_age: Duration = Field(86400.0, gt=0)
    concurrency: int = Field(16, ge=1, le=10_000)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _whsec(cls, v: Secret | None) -> Secret | None:
        if v is not None:
            try:
                key = standard_webhooks_key(v.get())
            except ValueError:
                raise ValueError(
                    "a sink secret is a Standard Webhooks key: 'whsec_' + base64"
                ) from None
            if len(key) < 16:
                raise ValueError("a sink secret's key is too short (at least 16 bytes)")
        return v

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # What aiohttp would refuse to send fails every delivery: refused here instead.
        # (The errors name headers, never their values: those may be credentials.)
        for name, value in v.items():
            if not name or not _TOKEN.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a header name")
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"the value of header {name!r} holds a line break or NUL")
        url = info.data.get("url")
        named = {n.lower() for n in v}
        if isinstance(url, str) and "authorization" in named:
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "an Authorization header and credentials in the URL: aiohttp sends "
                    "neither (every delivery would fail); keep one"
                )
        return v

    def matches(self, event_type: str) -> bool:
        """Whether this sink wants events of ``event_type`` (exact names or globs)."""
        return any(p == event_type or fnmatch.fnmatchcase(event_type, p) for p in self.events)


def tenant_problems(has_webhook_secrets: bool, mode: str, has_signing_secret: bool) -> list[str]:
    """What is wrong with a tenant as a whole: whether it has a way for events to come in.

    Checked by :class:`TenantConfig` and, when some of the tenant's fields are invalid
    (so that the model never gets that far), on the raw values by :func:`parse_config`.
    """
    out: list[str] = []
    if not has_webhook_secrets and mode in ("off", "fallback"):
        out.append(
            f"no webhook_secrets and poll.mode is {mode!r}: this tenant could receive nothing"
        )
    if mode != "off" and not has_signing_secret:
        out.append(
            f"poll.mode is {mode!r} but api.signing_secret is not set "
            "(set it, or poll.mode = 'off')"
        )
    return out


def _repeated(names: Iterable[str]) -> list[str]:
    counts = Counter(names)
    return sorted(n for n, c in counts.items() if c > 1)


class TenantConfig(_Section):
    slug: str = Field(pattern=_SLUG_RE)
    webhook_secrets: list[SecretField] = Field(default_factory=list)
    signature_tolerance: Duration = Field(300.0, ge=1)
    api: ApiConfig = Field(default_factory=ApiConfig)
    poll: PollConfig = Field(default_factory=PollConfig)
    sinks: list[SinkConfig] = Field(min_length=1, max_length=1000)

    @field_validator("sinks")
    @classmethod
    def _unique_sinks(cls, v: list[SinkConfig]) -> list[SinkConfig]:
        dupes = _repeated(s.name for s in v)
        if dupes:
            raise ValueError(f"sink names must be unique within a tenant: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _has_a_way_in(self) -> TenantConfig:
        problems = tenant_problems(
            bool(self.webhook_secrets), self.poll.mode, self.api.signing_secret is not None
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def sink(self, name: str) -> SinkConfig | None:
        return next((s for s in self.sinks if s.name == name), None)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    relay: RelaySection = Field(default_factory=RelaySection)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    tenants: list[TenantConfig] = Field(min_length=1)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, v: list[TenantConfig]) -> list[TenantConfig]:
        dupes = _repeated(t.slug for t in v)
        if dupes:
            raise ValueError(f"tenant slugs must be unique: {', '.join(dupes)}")
        return v

    @field_validator("admin")
    @classmethod
    def _distinct_listeners(cls, v: AdminConfig, info: ValidationInfo) -> AdminConfig:
        server = info.data.get("server")
        taken = {"server.listen": server.listen} if server is not None else {}
        for name, listen in (("admin.listen", v.listen), ("admin.worker_listen", v.worker_listen)):
            if listen is None or not (listen.path or listen.port):  # port 0: free ports
                continue
            for other, address in taken.items():
                if listen == address:
                    raise ValueError(f"{name} is {other} too ({listen})")
            taken[name] = listen
        return v

    def tenant(self, slug: str) -> TenantConfig | None:
        for t in self.tenants:
            if t.slug == slug:
                return t
        return None

    def warnings(self) -> list[str]:
        """Things that work but should not reach production (literal secrets...)."""
        out: list[str] = []
        if self.admin.token is not None and self.admin.token.is_literal:
            out.append("admin.token is a literal secret; use 'env:NAME' or 'file:/path'")
        for i, t in enumerate(self.tenants):
            for j, s in enumerate(t.webhook_secrets):
                if s.is_literal:
                    out.append(
                        f"tenants[{i}].webhook_secrets[{j}] is a literal secret; "
                        "use 'env:NAME' or 'file:/path'"
                    )
            if t.api.signing_secret is not None and t.api.signing_secret.is_literal:
                out.append(f"tenants[{i}].api.signing_secret is a literal secret")
            for k, sink in enumerate(t.sinks):
                if sink.secret is not None and sink.secret.is_literal:
                    out.append(f"tenants[{i}].sinks[{k}].secret is a literal secret")
                if sink.secret is None:
                    out.append(
                        f"tenants[{i}].sinks[{k}] ({sink.name}) has no secret: "
                        "deliveries to it are unsigned"
                    )
        return out


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("literal", "union"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


_SECRET_KEYS = frozenset({("admin", "token"), ("redis", "url")})


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, str, object]]:
    out: list[tuple[str, str, object]] = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            continue
        value: object = raw
        if (parts[0], parts[1]) not in _SECRET_KEYS:  # a token of digits stays a string
            with contextlib.suppress(tomllib.TOMLDecodeError):  # not TOML: the text itself
                value = tomllib.loads(f"v = {raw}")["v"]
        out.append((parts[0], parts[1], value))
    return out


def config_path(given: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The configuration file to read: ``given`` (``--config``), else
    ``$CHERT_RELAY_CONFIG``, else the first of :data:`DEFAULT_CONFIG_PATHS` that exists
    (or the first, for the error message)."""
    if given:
        return Path(given)
    found = (os.environ if env is None else env).get("CHERT_RELAY_CONFIG")
    if found:
        return Path(found)
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).exists():
            return Path(candidate)
    return Path(DEFAULT_CONFIG_PATHS[0])


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate the whole configuration.

    Raises :class:`ConfigError` listing every problem with its key path.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")], str(path)) from None
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([("", f"not valid TOML: {e}")], str(path)) from None
    return parse_config(data, base_dir=path.resolve().parent, env=env, source=str(path))


def parse_config(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "",
) -> Config:
    problems: list[tuple[str, str]] = []
    for section, key, value in _env_overrides(os.environ if env is None else env):
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append((f"{section}", f"cannot override {ENV_PREFIX}{section.upper()}__…"))
            continue
        target[key] = value
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            problems.append((_loc_to_path(tuple(err["loc"])), msg))
        for found in _tenant_checks_on_raw(data, problems):
            if found not in problems:
                problems.append(found)
        raise ConfigError(problems, source) from None


def _tenant_checks_on_raw(
    data: dict[str, Any], problems: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The tenant-level checks, for the tenants whose own fields failed (pydantic skips
    a model's checks then), so that one run reports every problem."""
    tenants = data.get("tenants")
    if not isinstance(tenants, list):
        return []
    out: list[tuple[str, str]] = []
    for i, raw in enumerate(tenants):
        where = f"tenants[{i}]"
        if not isinstance(raw, dict) or not any(p.startswith(where + ".") for p, _ in problems):
            continue
        poll, api = raw.get("poll", {}), raw.get("api", {})
        mode = poll.get("mode", "fallback") if isinstance(poll, dict) else None
        if mode not in ("off", "fallback", "always", "sse"):
            continue  # reported as a field problem already
        secrets = raw.get("webhook_secrets")
        signing = isinstance(api, dict) and api.get("signing_secret") is not None
        for msg in tenant_problems(bool(secrets), mode, signing):
            out.append((where, msg))
        sinks = raw.get("sinks")
        if isinstance(sinks, list):
            dupes = _repeated(
                s["name"] for s in sinks if isinstance(s, dict) and isinstance(s.get("name"), str)
            )
            if dupes:
                msg = f"sink names must be unique within a tenant: {', '.join(dupes)}"
                out.append((f"{where}.sinks", msg))
    return out
