"""A sink's configuration: where a tenant's events go, and how hard the relay tries.

A sink is of one *kind*: ``http`` (a POST to an ``http(s)://`` URL, the default), or a
broker — ``redis-stream`` (``XADD`` to ``stream`` on the Redis at ``redis(s)://…``),
``nats`` (a JetStream publish to ``subject`` at ``nats://…``/``tls://…``) or ``amqp``
(a RabbitMQ publish to ``exchange`` with ``routing_key`` at ``amqp(s)://…``). The kind
may be left out: the URL's scheme names it. Keys of another kind are errors, and so is
a broker kind whose client library (an optional extra) is not installed.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import ssl
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from relay.config import egress
from relay.config.base import HEADER_NAME, SLUG_RE, Section
from relay.config.egress import OAuth2Config, PemPath, TlsVersion
from relay.config.filters import EventFilter, compile_filter
from relay.config.values import (
    Duration,
    Rate,
    Secret,
    ServiceSecretField,
    check_http_url,
    plain_remote,
)
from relay.signing import standard_webhooks_key

SinkKind = Literal["http", "redis-stream", "nats", "amqp"]

# The URL schemes of each kind (the first names the kind when ``kind`` is left out).
SCHEMES: dict[str, tuple[str, ...]] = {
    "http": ("http", "https"),
    "redis-stream": ("redis", "rediss"),
    "nats": ("nats", "tls"),
    "amqp": ("amqp", "amqps"),
}
# The keys that only one kind has, and the kinds that need them.
KIND_KEYS: dict[str, str] = {
    "stream": "redis-stream",
    "max_len": "redis-stream",
    "subject": "nats",
    "exchange": "amqp",
    "routing_key": "amqp",
}
# The optional extra (and the module it brings) that a broker kind needs.
EXTRAS: dict[str, tuple[str, str]] = {"nats": ("nats", "nats"), "amqp": ("amqp", "aio_pika")}

# A NATS subject to publish to: dot-separated tokens, no wildcards, no white space.
_SUBJECT = re.compile(r"[^.\s*>]+(\.[^.\s*>]+)*")
_EXCHANGE = re.compile(r"[A-Za-z0-9_.:-]*")  # AMQP 0-9-1 exchange names


def kind_of_url(url: str) -> str | None:
    """The sink kind a URL's scheme names, if any."""
    scheme = urlsplit(url).scheme.lower()
    return next((k for k, schemes in SCHEMES.items() if scheme in schemes), None)


def extra_missing(kind: str) -> str | None:
    """The extra a broker kind needs when its client library is not installed."""
    found = EXTRAS.get(kind)
    if found is None or importlib.util.find_spec(found[1]) is not None:
        return None
    return found[0]


class SinkConfig(Section):
    name: str = Field(pattern=SLUG_RE)
    kind: SinkKind = "http"  # when left out, the URL's scheme names it
    url: str
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    # Which events of those types, by their fields (relay.config.filters): decided once,
    # at ingest; an event it keeps from the sink is "not routed: filter" in the event log.
    filter: EventFilter | None = None
    secret: ServiceSecretField | None = None
    timeout: Duration = Field(10.0, gt=0)
    max_attempts: int = Field(15, ge=1, le=1000)
    max_age: Duration = Field(86400.0, gt=0)
    concurrency: int = Field(16, ge=1, le=10_000)
    # A pace shared by every worker (relay/store/lua/lib/rate.lua), deliveries per
    # second, from "50/s" or "3000/m"; None: no limit.
    rate: Rate | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # Ordered delivery: "chat" delivers the events of one conversation (data.chat.id)
    # one at a time, in the order the relay took them in; other chats go on in parallel.
    # Events without a chat id are delivered unordered. (The key is named so that
    # another, such as a handle, can be added.)
    ordering: Literal["none", "chat"] = "none"
    # An ordered chat's event that becomes a dead letter: "skip" delivers the chat's
    # later events; "hold" keeps them waiting until it is replayed or purged.
    on_dead_letter: Literal["skip", "hold"] = "skip"
    # Broker sinks: the password for the URL's user (or, without a user, the NATS token
    # or Redis' default user), so that the URL itself need not hold a secret.
    password: ServiceSecretField | None = None
    stream: str | None = Field(None, min_length=1, max_length=1024)  # redis-stream
    max_len: int | None = Field(None, ge=1)  # redis-stream: trim to about this many
    subject: str | None = Field(None, max_length=1024)  # nats
    exchange: str | None = Field(None, max_length=255)  # amqp ("" is the default one)
    routing_key: str | None = Field(None, max_length=200)  # amqp
    # http sinks: TLS, a proxy and OAuth2 (relay.config.egress). The order matters: a
    # key file is checked with its password, and a certificate against its key.
    ca_file: PemPath | None = None  # trusted instead of the system's store...
    system_ca: bool | None = None  # ...or as well, when true
    client_key_password: ServiceSecretField | None = None
    client_key_file: PemPath | None = None
    client_cert_file: PemPath | None = None  # mutual TLS: presented when the sink asks
    tls_min_version: TlsVersion | None = None
    # A forward proxy (CONNECT for https://); unset: the environment's HTTPS_PROXY /
    # HTTP_PROXY / NO_PROXY; "none": direct, whatever the environment says.
    proxy: str | None = None
    proxy_password: ServiceSecretField | None = None  # for the user the proxy URL names
    oauth2: OAuth2Config | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind_from_scheme(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data and isinstance(data.get("url"), str):
            found = kind_of_url(data["url"])
            if found is not None:
                data = {**data, "kind": found}
        return data

    @field_validator("filter", mode="before")
    @classmethod
    def _filter(cls, v: Any) -> EventFilter | None:
        return None if v is None else compile_filter(v)

    @field_validator("secret")
    @classmethod
    def _whsec(cls, v: Secret | None) -> Secret | None:
        if v is not None and v.resolved:
            try:
                key = standard_webhooks_key(v.get())
            except ValueError:
                raise ValueError(
                    "a sink secret is a Standard Webhooks key: 'whsec_' + base64"
                ) from None
            if len(key) < 16:
                raise ValueError("a sink secret's key is too short (at least 16 bytes)")
        return v

    @field_validator("url")
    @classmethod
    def _url_of_kind(cls, v: str, info: ValidationInfo) -> str:
        # The errors never show the value: a mistyped URL may carry a credential.
        kind = info.data.get("kind", "http")
        if kind == "http":
            return check_http_url(v)
        schemes = SCHEMES[kind]
        parts = urlsplit(v)
        if parts.scheme.lower() not in schemes:
            wanted = " or ".join(f"{s}://" for s in schemes)
            raise ValueError(f"a {kind} sink's URL is {wanted}")
        if any(c.isspace() for c in v):
            raise ValueError("a URL cannot contain spaces")
        if not parts.hostname:
            raise ValueError("the URL names no host")
        try:
            parts.port  # noqa: B018 - raises when out of range or not a number
        except ValueError:
            raise ValueError("the URL's port is not a number from 0 to 65535") from None
        return v

    @field_validator("headers")
    @classmethod
    def _sendable_headers(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        # What aiohttp would refuse to send fails every delivery: refused here instead.
        # (The errors name headers, never their values: those may be credentials.)
        for name, value in v.items():
            if not name or not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a header name")
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"the value of header {name!r} holds a line break or NUL")
        url = info.data.get("url")
        named = {n.lower() for n in v}
        if isinstance(url, str) and "authorization" in named and info.data.get("kind") == "http":
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "an Authorization header and credentials in the URL: aiohttp sends "
                    "neither (every delivery would fail); keep one"
                )
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        return None if v is None else egress.check_ca_file(v)

    @field_validator("client_key_file")
    @classmethod
    def _key_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else egress.check_key_file(v, info.data.get("client_key_password"))

    @field_validator("client_cert_file")
    @classmethod
    def _cert_file(cls, v: str | None) -> str | None:
        return None if v is None else egress.check_cert_file(v)

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        return None if v is None else egress.check_proxy(v)

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is not None and not _SUBJECT.fullmatch(v):
            raise ValueError(
                "a subject is dot-separated tokens without spaces or the wildcards * and >"
            )
        return v

    @field_validator("exchange")
    @classmethod
    def _exchange(cls, v: str | None) -> str | None:
        if v is not None and not _EXCHANGE.fullmatch(v):
            raise ValueError("an exchange name holds only letters, digits and - _ . :")
        return v

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> SinkConfig:
        kind = self.kind
        for key, owner in KIND_KEYS.items():
            if getattr(self, key) is not None and owner != kind:
                raise ValueError(f"{key} is for {owner} sinks; this sink is {kind}")
        if kind == "http" and self.password is not None:
            raise ValueError(
                "password is for broker sinks; an http sink takes credentials in headers"
            )
        if kind == "redis-stream" and self.stream is None:
            raise ValueError("a redis-stream sink needs stream (the stream's key)")
        if kind == "nats" and self.subject is None:
            raise ValueError("a nats sink needs subject (the subject a JetStream stream captures)")
        if kind == "amqp":
            if self.exchange is None:
                raise ValueError(
                    'an amqp sink needs exchange ("" for the default exchange, which '
                    "routes to the queue named by routing_key)"
                )
            if self.exchange == "" and not self.routing_key:
                raise ValueError('the default exchange ("") needs routing_key, a queue\'s name')
        self._check_egress()
        extra = extra_missing(kind)
        if extra is not None:
            raise ValueError(
                f"a {kind} sink needs the {extra!r} extra, which is not installed: "
                f"pip install 'chert-relay[{extra}]'"
            )
        return self

    def _check_egress(self) -> None:
        """The TLS, proxy and OAuth2 keys together (each file was checked alone)."""
        given = [k for k in egress.EGRESS_KEYS if getattr(self, k) is not None]
        if given and self.kind != "http":
            raise ValueError(
                f"{given[0]} is for http sinks; this sink is {self.kind} (a broker's TLS "
                "and credentials are in its URL and password)"
            )
        tls = [k for k in egress.TLS_KEYS if getattr(self, k) is not None]
        if tls and urlsplit(self.url).scheme.lower() != "https":
            raise ValueError(f"{tls[0]} is for https:// sinks; this sink's URL is http://")
        if self.system_ca is False and self.ca_file is None:
            raise ValueError("system_ca = false needs ca_file: otherwise nothing is trusted")
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("client_key_file needs client_cert_file (the key's certificate)")
        if self.client_key_password is not None and self.client_key_file is None:
            raise ValueError("client_key_password is for client_key_file, which is not set")
        password = self.client_key_password
        if self.client_cert_file is not None and (password is None or password.resolved):
            # (with a password this command could not read, and does not use: unchecked)
            try:
                self.tls_context()
            except (OSError, ssl.SSLError):
                if self.client_key_file is None:
                    raise ValueError(
                        "client_cert_file holds no private key: set client_key_file"
                    ) from None
                raise ValueError(
                    "client_key_file is not the private key of client_cert_file's certificate"
                ) from None
        self._check_proxy_credentials()
        if self.oauth2 is not None:
            if any(n.lower() == "authorization" for n in self.headers):
                raise ValueError(
                    "oauth2 sends its token in the Authorization header: remove the "
                    "sink's own Authorization header"
                )
            parts = urlsplit(self.url)
            if parts.username is not None or parts.password is not None:
                raise ValueError("oauth2 and credentials in the URL: keep one")
            if plain_remote(self.url):
                raise ValueError(
                    "oauth2 sends a bearer token with every delivery: the sink's URL is "
                    "https:// (http:// only to this machine)"
                )

    def _check_proxy_credentials(self) -> None:
        if self.proxy_password is None:
            return
        if self.proxy is None or self.proxy == egress.NO_PROXY:
            raise ValueError("proxy_password needs proxy (http://user@host:port)")
        parts = urlsplit(self.proxy)
        if parts.username is None:
            raise ValueError(
                "proxy_password needs the proxy URL to name the user: http://user@host:port"
            )
        if parts.password is not None:
            raise ValueError("the proxy URL holds a password, and proxy_password is set: keep one")

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of deliveries to this sink, or None for the defaults (the
        system's store). Raises ``OSError`` or ``ssl.SSLError`` if a file is unusable."""
        if not any(getattr(self, k) is not None for k in egress.TLS_KEYS):
            return None
        return egress.tls_context(
            ca_file=self.ca_file,
            system_ca=self.system_ca,
            client_cert_file=self.client_cert_file,
            client_key_file=self.client_key_file,
            client_key_password=self.client_key_password,
            tls_min_version=self.tls_min_version,
        )

    def matches(self, event_type: str) -> bool:
        """Whether this sink wants events of ``event_type`` (exact names or globs); its
        ``filter``, if any, then decides by the event's fields (at ingest)."""
        return any(p == event_type or fnmatch.fnmatchcase(event_type, p) for p in self.events)

    @property
    def is_broker(self) -> bool:
        return self.kind != "http"

    @property
    def target(self) -> str:
        """Where in the broker the sink publishes (shown to operators): the stream,
        subject or exchange and routing key; "" for an http sink."""
        if self.kind == "redis-stream":
            return f"stream {self.stream}"
        if self.kind == "nats":
            return f"subject {self.subject}"
        if self.kind == "amqp":
            return f"exchange {self.exchange!r} routing key {self.routing_key or ''!r}"
        return ""
