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
import math
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
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.errors import ConfigError
from relay.signing import standard_webhooks_key

ENV_PREFIX = "CHERT_RELAY__"
DEFAULT_CONFIG_PATHS = ("/etc/chert-relay/relay.toml",)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
MAX_DURATION_S = 10 * 365 * 86400.0  # anything longer is a typo, and Redis TTLs must fit
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(
                f"{value!r} is not a duration; use seconds or e.g. '30s', '5m', '2h', '7d'"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if math.isnan(seconds):
        raise ValueError("a duration must be a number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError("a duration cannot be longer than 10 years")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Secret:
    """A secret value with where it came from; never shows the value in repr or str."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self.origin = origin  # "env:NAME", "file:/path" or "literal"

    def get(self) -> str:
        return self._value

    @property
    def is_literal(self) -> bool:
        return self.origin == "literal"

    def __repr__(self) -> str:
        return f"Secret({self.origin})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def resolve_secret(value: object, base_dir: Path | None = None) -> Secret:
    """Resolve ``env:NAME``, ``file:/path`` (relative to ``base_dir``) or a literal."""
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("a secret is a string: 'env:NAME', 'file:/path' or the literal value")
    if value.startswith("env:"):
        name = value[4:]
        if not name:
            raise ValueError("'env:' needs a variable name")
        found = os.environ.get(name)
        if found is None or found == "":
            raise ValueError(f"environment variable {name} is not set")
        return Secret(found.strip(), value)
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"cannot read secret file {path}: {e.strerror}") from None
        if not text:
            raise ValueError(f"secret file {path} is empty")
        return Secret(text, f"file:{path}")
    if not value:
        raise ValueError("a secret cannot be empty")
    return Secret(value, "literal")


def _secret_validator(value: object, info: ValidationInfo) -> Secret:
    base = (info.context or {}).get("base_dir")
    return resolve_secret(value, base)


SecretField = Annotated[Secret, BeforeValidator(_secret_validator)]


class Listen(BaseModel):
    """A TCP ``host:port`` or ``unix:/path`` to listen on."""

    model_config = ConfigDict(frozen=True)
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(value: object) -> Listen:
    if isinstance(value, Listen):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("listen is 'host:port' or 'unix:/path'")
    if value.startswith("unix:"):
        if not value[5:]:
            raise ValueError("'unix:' needs a socket path: 'unix:/run/chert-relay.sock'")
        return Listen(path=value[5:])
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not 'host:port' or 'unix:/path'")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host=host, port=p)


ListenField = Annotated[Listen, BeforeValidator(parse_listen)]


def _check_http_url(value: str) -> str:
    # The errors never show the value: a mistyped URL may carry a credential.
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL (scheme://host/…)")
    if any(c.isspace() for c in value):
        raise ValueError("a URL cannot contain spaces")
    try:
        parts.port  # noqa: B018 - raises when out of range or not a number
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    return value


HttpUrl = Annotated[str, BeforeValidator(lambda v: _check_http_url(v) if isinstance(v, str) else v)]

_SLUG_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"


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


class AdminConfig(_Section):
    listen: ListenField | None = Field(default_factory=lambda: parse_listen("127.0.0.1:9090"))
    token: SecretField | None = None


class RedisConfig(_Section):
    url: SecretField | None = None  # absent: a private redis-server under state_dir
    key_prefix: str = Field("chert-relay", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    server_binary: str = "redis-server"
    connect_timeout: Duration = 5.0
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

    def matches(self, event_type: str) -> bool:
        """Whether this sink wants events of ``event_type`` (exact names or globs)."""
        return any(p == event_type or fnmatch.fnmatchcase(event_type, p) for p in self.events)


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
        if not self.webhook_secrets and self.poll.mode in ("off", "fallback"):
            raise ValueError(
                "no webhook_secrets and poll.mode is "
                f"{self.poll.mode!r}: this tenant could receive nothing"
            )
        if self.poll.mode != "off" and self.api.signing_secret is None:
            raise ValueError(
                f"poll.mode is {self.poll.mode!r} but api.signing_secret is not set "
                "(set it, or poll.mode = 'off')"
            )
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
        server, listen = info.data.get("server"), v.listen
        same = server is not None and listen is not None and listen == server.listen
        if same and listen is not None and (listen.path or listen.port):  # port 0: free ports
            raise ValueError(f"admin.listen is server.listen too ({listen})")
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
        raise ConfigError(problems, source) from None
