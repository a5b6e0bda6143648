"""The configuration's models: one TOML file, validated once into frozen sections.

Unknown keys are errors (a misspelt setting must never be silently ignored).
Durations accept seconds or ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``.
Secrets are ``"env:NAME"``, ``"file:/path"`` or a literal (accepted, with a warning).
The value types are in :mod:`relay.config.values`; reading a file (and the environment
overrides) in :mod:`relay.config.load`.

The module is a little over 500 lines and stays whole: it is one role, the schema of
one file, and each section's checks sit beside its fields.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from relay.config.base import SLUG_RE as _SLUG_RE
from relay.config.base import Section as _Section
from relay.config.sinks import SinkConfig
from relay.config.values import (
    Duration,
    HostPort,
    HttpUrl,
    LenientSecretField,
    ListenField,
    Secret,
    SecretField,
    ServiceSecretField,
    Size,
    parse_listen,
    plain_remote,
    target_problem,
)
from relay.errors import ConfigError

MIN_TOKEN_CHARS = 24  # shorter admin tokens are warned about


MIN_WEBHOOK_SECRET_BYTES = 16  # shorter webhook secrets get a warning


class ServerConfig(_Section):
    listen: ListenField = Field(default_factory=lambda: parse_listen("127.0.0.1:8080"))
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    # the bodies still arriving, all connections together, hold at most this much: past
    # it the longest-stalled one gives way, or the request gets 503 (Chert retries)
    max_body_memory: Annotated[Size, Field(ge=1_048_576, le=1 << 40)] | None = None
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

    @property
    def body_memory(self) -> int:
        """``max_body_memory``, or by default 64 MiB (at least two bodies)."""
        if self.max_body_memory is not None:
            return self.max_body_memory
        return max(64 * 1_048_576, 2 * self.max_body_bytes)

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> ServerConfig:
        if self.max_body_memory is not None and self.max_body_memory < 2 * self.max_body_bytes:
            raise ValueError(
                f"max_body_memory ({self.max_body_memory}) must be at least twice "
                f"max_body_bytes ({self.max_body_bytes}): a body that fits could never "
                "be held, and would get 503 for ever"
            )
        return self


class AdminTokenConfig(_Section):
    """One ``[[admin.tokens]]`` entry: a named token with a scope over some tenants.

    ``read`` shows (the operator page, ``GET /api/…``, and ``/metrics`` when it needs a
    token); ``replay`` also changes the dead-letter store: replay and purge.
    """

    name: str = Field(pattern=_SLUG_RE)
    token: LenientSecretField
    scope: Literal["read", "replay"]
    tenants: list[str] = Field(min_length=1)  # slugs, or ["*"]: every tenant

    @field_validator("tenants")
    @classmethod
    def _tenant_list(cls, v: list[str]) -> list[str]:
        if "*" in v and len(v) > 1:
            raise ValueError('"*" means every tenant: list it alone')
        dupes = repeated(v)
        if dupes:
            raise ValueError(f"tenants listed twice: {', '.join(dupes)}")
        return v

    @property
    def all_tenants(self) -> bool:
        return self.tenants == ["*"]


class AdminConfig(_Section):
    # `run` and `serve` listen here; `worker` on worker_listen, so that the roles can run
    # side by side on one host from one file (`--admin-listen` overrides either).
    listen: ListenField | None = Field(default_factory=lambda: parse_listen("127.0.0.1:9090"))
    worker_listen: ListenField | None = Field(
        default_factory=lambda: parse_listen("127.0.0.1:9091")
    )
    # Every tenant, scope "replay" (the token from before scoped tokens existed).
    token: LenientSecretField | None = None
    tokens: list[AdminTokenConfig] = Field(default_factory=list)
    # /metrics answers 401 without a valid admin token (any scope, any tenants).
    metrics_token_required: bool = False
    # The listener's own bounds (relay/admin/listener.py): connections open at once (past
    # it, 503 and closed), how long a request head may take once begun, and how long a
    # connection may sit idle.
    max_connections: int = Field(256, ge=1, le=100_000)
    # The Host names the listener answers besides IP addresses and localhost
    # ("relay.internal", "*.internal", "*" for any); unset: any on a listener that is
    # not loopback, only those on a loopback one (relay/admin/hosts.py: DNS rebinding).
    allowed_hosts: list[str] | None = None
    head_timeout: Annotated[Duration, Field(ge=0.1, le=3600)] = 10.0
    idle_timeout: Annotated[Duration, Field(ge=0.1, le=86400)] = 60.0

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not re.fullmatch(r"\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", name):
                raise ValueError(f"{name!r} is not a host name (a name, '*.' and a domain, or '*')")
        return v

    @field_validator("tokens")
    @classmethod
    def _distinct_tokens(cls, v: list[AdminTokenConfig]) -> list[AdminTokenConfig]:
        dupes = repeated(t.name for t in v)
        if dupes:
            raise ValueError(f"admin token names must be unique: {', '.join(dupes)}")
        values = [t.token.get() for t in v if t.token.resolved]
        if len(set(values)) < len(values):
            # Not which: the message must not help guess a secret.
            raise ValueError("two admin tokens have the same value: each needs its own")
        return v

    def warnings(self) -> list[str]:
        out: list[str] = []
        if self.token is not None and self.token.is_literal:
            out.append("admin.token is a literal secret; use 'env:NAME' or 'file:/path'")
        named = [("admin.token", self.token)] + [
            (f"admin.tokens[{i}] ({t.name})", t.token) for i, t in enumerate(self.tokens)
        ]
        for where, secret in named:
            if secret is None or not secret.resolved:
                continue
            if len(secret.get()) < MIN_TOKEN_CHARS:
                out.append(f"{where} is shorter than {MIN_TOKEN_CHARS} characters: easy to guess")
        for i, t in enumerate(self.tokens):
            if t.token.is_literal:
                out.append(f"admin.tokens[{i}] ({t.name}) is a literal secret")
        return out

    @model_validator(mode="after")
    def _token_not_reused(self) -> AdminConfig:
        if self.token is not None and any(t.token == self.token for t in self.tokens):
            raise ValueError("an [[admin.tokens]] entry has the same value as admin.token")
        if self.metrics_token_required and self.token is None and not self.tokens:
            raise ValueError("metrics_token_required needs admin.token or [[admin.tokens]]")
        return self


class RedisConfig(_Section):
    # Where Redis is: a URL, or a Sentinel deployment (sentinels + service_name); neither:
    # a private redis-server under state_dir (the embedded default).
    url: SecretField | None = None
    sentinels: list[HostPort] = Field(default_factory=list)
    service_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    # With sentinels: the data nodes' credentials, database and TLS (a URL carries its own)
    username: str | None = None
    password: SecretField | None = None
    db: int = Field(0, ge=0, le=15)
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: SecretField | None = None
    sentinel_tls: bool = False
    key_prefix: str = Field("chert-relay", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    server_binary: str = "redis-server"
    connect_timeout: Duration = 5.0
    # At start-up, wait this long for a Redis that does not answer yet (a slow boot)
    # before giving up with exit code 69.
    startup_wait: Duration = 30.0
    require_aof: bool = False  # refuse (rather than warn) when AOF is off
    # Answer a webhook 2xx only once this many replicas have its event (Redis WAIT after
    # each ingest batch), else 503; 0: the primary's fsync is enough.
    min_replica_acks: int = Field(0, ge=0, le=16)
    replica_ack_timeout: Annotated[Duration, Field(gt=0, le=60)] = 0.5

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, v: Secret | None) -> Secret | None:
        if v is not None and urlsplit(v.get()).scheme not in ("redis", "rediss", "unix"):
            # Not the value itself: it may carry the password.
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _one_way_to_redis(self) -> RedisConfig:
        if self.sentinels and self.url is not None:
            raise ValueError("set either url or sentinels (with service_name), not both")
        if self.sentinels and not self.service_name:
            raise ValueError("sentinels need service_name: the name the sentinels monitor")
        if self.service_name and not self.sentinels:
            raise ValueError("service_name is for sentinels: list them in sentinels")
        if not self.sentinels and (self.password or self.username or self.db or self.tls):
            raise ValueError(
                "username, password, db and tls are for sentinels; a url carries its own"
            )
        return self


class RelaySection(_Section):
    state_dir: Path = Path("/var/lib/chert-relay")
    dedupe_ttl: Duration = Field(7 * 86400.0, gt=0)


class EventLogConfig(_Section):
    """The event log (:mod:`relay.store.eventlog`): a record of every event taken in,
    its arrivals, and every attempt to every sink, kept for ``retention`` and within
    ``max_memory`` of Redis (oldest first)."""

    enabled: bool = True
    retention: Annotated[Duration, Field(ge=60)] = 72 * 3600.0
    max_memory: Annotated[Size, Field(ge=1_048_576)] = 512 * 1_048_576


class TelemetryConfig(_Section):
    """Traces over OpenTelemetry (:mod:`relay.telemetry`): off by default; where they go,
    and how many are kept, come from the standard ``OTEL_*`` variables."""

    tracing: bool = False

    @field_validator("tracing")
    @classmethod
    def _extra_installed(cls, v: bool) -> bool:
        if v:
            from relay.telemetry import missing_extra

            if missing_extra():
                raise ValueError(
                    "tracing needs the 'otel' extra, which is not installed: "
                    "pip install 'chert-relay[otel]'"
                )
        return v


class WorkerConfig(_Section):
    max_jobs: int = Field(200, ge=1, le=10_000)
    # Workers are woken when work is queued; this is how long one goes without reading
    # the queue when nothing wakes it (a lost wake-up, a retry coming due).
    poll_delay: Duration = Field(0.5, gt=0)
    # HTTP sinks only at public addresses: none on loopback, private, link-local (cloud
    # metadata)... (relay/delivery/targets.py); a restart applies a change
    refuse_private_targets: bool = False
    shutdown_grace: Duration = 30.0  # running deliveries get this long after SIGTERM
    queue_read_limit: int | None = Field(None, ge=1)
    # Delivery retries: the wait before attempt n+1 is retry_backoff * 2**(n-1), capped at
    # retry_backoff_max, minus up to 25% jitter; a sink's Retry-After wins, up to
    # retry_after_max.
    retry_backoff: Duration = Field(1.0, gt=0)
    retry_backoff_max: Duration = Field(3600.0, gt=0)
    retry_after_max: Duration = Field(3600.0, gt=0)
    # Per-sink circuit breaker: opens when, over the last breaker_window, at least
    # breaker_failures attempts failed and they were at least breaker_failure_rate of the
    # attempts; lets one probe through every breaker_cooldown while it is open (the
    # sink's other deliveries wait, at no cost), and closes on the probe's success.
    breaker_failures: int = Field(5, ge=1, le=10_000)
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_window: Duration = Field(30.0, ge=1)
    breaker_cooldown: Duration = Field(2.0, gt=0)
    # A sink that has given no answer at all (only timeouts and connection errors) for
    # this long gets a warning, once, and a line when it answers again.
    sink_silence_warn: Duration = Field(60.0, gt=0)
    # No longer used (accepted so that older files still load): a delivery whose sink is
    # at its in-flight cap now waits, set aside, until a slot frees.
    busy_defer: Duration | None = Field(None, gt=0)
    # A job of a sink this worker does not know — a reload that reached `serve` before
    # this worker, or a sink removed — is put off this long before it is dead-lettered
    # as gone.
    unknown_sink_grace: Duration = Field(600.0, gt=0)


class ApiConfig(_Section):
    base_url: HttpUrl = "https://console.trychert.com/api/v1"
    auth: Literal["hmac", "bearer"] = "hmac"
    signing_secret: ServiceSecretField | None = None
    timeout: Duration = 30.0
    max_attempts: int = Field(4, ge=1, le=100)  # tries per call on retryable errors
    max_backoff: Duration = Field(60.0, gt=0)  # cap on one wait between tries
    # bearer auth sends the secret itself on every call: over plain http:// to another
    # machine anyone on the path can read it; refused unless this is set (and warned)
    insecure_bearer_over_http: bool = False

    @model_validator(mode="after")
    def _bearer_only_over_tls(self) -> ApiConfig:
        if (
            self.auth == "bearer"
            and not self.insecure_bearer_over_http
            and plain_remote(self.base_url)
        ):
            raise ValueError(
                f"auth = 'bearer' sends the API secret in every request, and base_url "
                f"{self.base_url} is plain http:// to another machine: use https://, "
                "auth = 'hmac', or set insecure_bearer_over_http = true"
            )
        return self


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
    if mode == "fallback" and not has_signing_secret:
        # The default stays fallback even without API credentials: falling back to
        # webhooks only would lose, silently, the events missed while webhooks lapse.
        out.append(
            "poll.mode is 'fallback' (the default: poll Chert's events API when webhooks "
            "lapse) but api.signing_secret is not set (set it, or poll.mode = 'off' for "
            "webhooks only)"
        )
    elif mode != "off" and not has_signing_secret:
        out.append(
            f"poll.mode is {mode!r} but api.signing_secret is not set "
            "(set it, or poll.mode = 'off')"
        )
    return out


def repeated(names: Iterable[str]) -> list[str]:
    counts = Counter(names)
    return sorted(n for n, c in counts.items() if c > 1)


class TenantConfig(_Section):
    slug: str = Field(pattern=_SLUG_RE)
    webhook_secrets: list[ServiceSecretField] = Field(default_factory=list)
    # how old a webhook's signed timestamp may be; at most a day (Chert signs each
    # attempt as it sends it), and always shorter than relay.dedupe_ttl
    signature_tolerance: Duration = Field(300.0, ge=1, le=86400)
    # Chert sends bodies uncompressed: a Content-Encoding is refused (415) before any
    # decoding unless this is set; then gzip and deflate are decoded, at most 20 times
    # the compressed size (relay/edge/decoding.py) and never past server.max_body_bytes,
    # so work before the signature check stays in proportion to what was sent.
    accept_compressed: bool = False
    api: ApiConfig = Field(default_factory=ApiConfig)
    poll: PollConfig = Field(default_factory=PollConfig)
    sinks: list[SinkConfig] = Field(min_length=1, max_length=1000)

    @field_validator("sinks")
    @classmethod
    def _unique_sinks(cls, v: list[SinkConfig]) -> list[SinkConfig]:
        dupes = repeated(s.name for s in v)
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
    event_log: EventLogConfig = Field(default_factory=EventLogConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    tenants: list[TenantConfig] = Field(min_length=1)

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, v: list[TenantConfig]) -> list[TenantConfig]:
        dupes = repeated(t.slug for t in v)
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

    @model_validator(mode="after")
    def _tolerance_within_the_seen_mark(self) -> Config:
        ttl = self.relay.dedupe_ttl
        for i, t in enumerate(self.tenants):
            if t.signature_tolerance >= ttl:
                raise ValueError(
                    f"tenants[{i}].signature_tolerance ({t.signature_tolerance:g}s) must be "
                    f"shorter than relay.dedupe_ttl ({ttl:g}s): a captured webhook sent "
                    "again after its event's seen mark expired would be taken as new"
                )
        return self

    @model_validator(mode="after")
    def _public_targets_only(self) -> Config:
        if not self.worker.refuse_private_targets:
            return self
        for i, t in enumerate(self.tenants):
            for j, s in enumerate(t.sinks):
                problem = target_problem(s.url) if s.kind == "http" else None
                if problem is None and s.oauth2 is not None:
                    problem = target_problem(s.oauth2.token_url)
                    problem = None if problem is None else f"oauth2.token_url: {problem}"
                if problem is not None:
                    raise ValueError(
                        f"tenants[{i}].sinks[{j}] ({s.name}): {problem}, and "
                        "worker.refuse_private_targets is set"
                    )
        return self

    @model_validator(mode="after")
    def _token_tenants_exist(self) -> Config:
        known = {t.slug for t in self.tenants}
        for i, token in enumerate(self.admin.tokens):
            unknown = [s for s in token.tenants if s != "*" and s not in known]
            if unknown:
                raise ValueError(
                    f"admin.tokens[{i}] ({token.name}) names unknown tenant(s): "
                    f"{', '.join(unknown)}"
                )
        return self

    def tenant(self, slug: str) -> TenantConfig | None:
        for t in self.tenants:
            if t.slug == slug:
                return t
        return None

    def warnings(self) -> list[str]:
        """Things that work but should not reach production (literal secrets...)."""
        out: list[str] = []
        out += self.admin.warnings()
        for i, t in enumerate(self.tenants):
            api = t.api
            if (
                api.auth == "bearer"
                and api.insecure_bearer_over_http
                and plain_remote(api.base_url)
            ):
                out.append(
                    f"tenants[{i}].api: bearer auth over plain http:// "
                    f"({api.base_url}): the API secret crosses the network readable"
                )
            for j, s in enumerate(t.webhook_secrets):
                with contextlib.suppress(ConfigError, ValueError, OSError):
                    if len(s.get().encode()) < MIN_WEBHOOK_SECRET_BYTES:
                        out.append(
                            f"tenants[{i}].webhook_secrets[{j}] is shorter than "
                            f"{MIN_WEBHOOK_SECRET_BYTES} bytes: a short HMAC key can be guessed"
                        )
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
                if sink.password is not None and sink.password.is_literal:
                    out.append(f"tenants[{i}].sinks[{k}].password is a literal secret")
                if sink.is_broker and urlsplit(sink.url).password is not None:
                    out.append(
                        f"tenants[{i}].sinks[{k}].url holds a password; use "
                        "password = 'env:NAME' or 'file:/path'"
                    )
                out += _egress_warnings(f"tenants[{i}].sinks[{k}]", sink)
        return out


def _egress_warnings(where: str, sink: SinkConfig) -> list[str]:
    """A sink's TLS, proxy and OAuth2 secrets written in the file itself."""
    named = [
        ("client_key_password", sink.client_key_password),
        ("proxy_password", sink.proxy_password),
        ("oauth2.client_secret", None if sink.oauth2 is None else sink.oauth2.client_secret),
    ]
    out = [f"{where}.{key} is a literal secret" for key, s in named if s and s.is_literal]
    if sink.proxy is not None and urlsplit(sink.proxy).password is not None:
        out.append(
            f"{where}.proxy holds a password; use proxy_password = 'env:NAME' or 'file:/path'"
        )
    return out
