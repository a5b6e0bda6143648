"""One HTTP attempt at a sink: the request the relay sends, and what came back.

The body is the stored envelope, byte for byte. Headers: Standard Webhooks
(``webhook-id`` is Chert's ``event_id``, stable across attempts and replays;
``webhook-timestamp``; ``webhook-signature`` when the sink has a secret), plus
``X-Chert-Event-Type``, ``X-Chert-Tenant``, ``X-Relay-Attempt`` and ``X-Relay-Source``,
and the sink's own static headers (which cannot replace the relay's). Redirects are
not followed. An error answer's text is kept for the dead letter and the log only
after :func:`scrub` has blanked every secret of the sink in it — its headers' and URL's
credentials, its proxy's, its OAuth2 client secret and the token it sent.

How a request goes out (the sink's TLS context and proxy) is made once per
configuration (:mod:`relay.delivery.egress`). An OAuth2 sink gets
``Authorization: Bearer <token>`` (:mod:`relay.delivery.oauth2`); when it answers 401,
a fresh token is fetched and the request sent once more, inside the same attempt and
its timeout.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from yarl import URL

from relay import __version__
from relay.config import SinkConfig
from relay.config.egress import NO_PROXY, OAuth2Config
from relay.delivery import egress
from relay.delivery.oauth2 import TokenError, Tokens, client_secrets
from relay.delivery.retry import parse_retry_after, retryable
from relay.signing import standard_webhooks_key, standard_webhooks_signature

ERROR_MAX_CHARS = 300
EXCERPT_MAX_CHARS = 512  # of a 2xx answer's body, kept in the event log
ERROR_BODY_READ = 1024  # bytes of an error answer read; scrub() blanks secrets, then cuts
OK_BODY_READ = 65536  # read from a 2xx answer, so that its connection can be reused


HEADER_VALUE_MAX = 256  # characters of an event type in X-Chert-Event-Type


def header_value(text: str) -> str:
    """``text`` as an HTTP header value: control characters (which would end the header
    line) escaped, not sent, and cut to HEADER_VALUE_MAX characters with ``...`` — a sink
    refuses a request with a 60 KB header, and the body carries the whole type. Event
    types come from Chert's body and are not checked."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) > HEADER_VALUE_MAX:
        text = text[: HEADER_VALUE_MAX - 3] + "..."
    return text


_WORDS = re.compile(r"[\s=,;:]+")


def _basic_parts(value: str) -> list[str]:
    """The user and password inside an ``Authorization: Basic <base64>`` value."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return []
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return []
    user, _, password = decoded.partition(":")
    return [p for p in (decoded, user, password) if len(p) >= 4]


def credentials(sink: SinkConfig) -> list[str]:
    """Every credential the relay sends to ``sink``, as a sink might echo it back."""
    secrets = [v for v in sink.headers.values() if len(v) >= 4]
    # A sink may echo only the credential part of a header (the token of "Bearer tok…"),
    # or what a Basic one decodes to.
    secrets += [w for v in sink.headers.values() for w in _WORDS.split(v) if len(w) >= 8]
    secrets += [p for v in sink.headers.values() for p in _basic_parts(v)]
    # Credentials in the URL go out as the "Authorization: Basic …" aiohttp derives from
    # them (user and password percent-decoded first).
    url = URL(sink.url)
    derived = aiohttp.BasicAuth.from_url(url)
    if derived is not None:
        secrets += [p for p in (derived.login, derived.password) if p]
        try:
            basic = derived.encode()
        except UnicodeEncodeError:  # aiohttp cannot send it either
            basic = ""
        secrets += [basic, basic.partition(" ")[2]] if basic else []
    if sink.secret is not None:
        secrets.append(sink.secret.get())
    if sink.password is not None:
        secrets.append(sink.password.get())
    # The way out: the proxy's credentials, the key's password, the OAuth2 client's
    # secret. (The environment's proxy, and the token sent, the sink client adds.)
    for s in (sink.proxy_password, sink.client_key_password):
        if s is not None:
            secrets.append(s.get())
    if sink.proxy is not None and sink.proxy != NO_PROXY:
        secrets += egress.proxy_secrets(URL(sink.proxy))
    if sink.oauth2 is not None:
        secrets += client_secrets(sink.oauth2)
    return secrets


def clip(text: str, limit: int = ERROR_MAX_CHARS) -> str:
    """One line, at most ``limit`` characters."""
    return " ".join(text.split())[:limit]


def scrub(
    text: str, sink: SinkConfig, limit: int = ERROR_MAX_CHARS, extra: Iterable[str] = ()
) -> str:
    """One line, at most ``limit`` characters, with the sink's secrets (and ``extra``
    ones) blanked out."""
    secrets = credentials(sink) + [s for s in extra if len(s) >= 4]
    parts = urlsplit(sink.url)
    # Webhook URLs often carry their credential in the path (…/hooks/T01/B02/XyZ…):
    # the path goes too, whole and by segment, unless it is too short to be one.
    segments = [seg for seg in parts.path.split("/") if len(seg) >= 8]
    path = parts.path if len(parts.path) >= 8 else ""
    values = [v for _, v in parse_qsl(parts.query, keep_blank_values=True) if len(v) >= 8]
    secrets += [
        p for p in (parts.password, parts.username, parts.query, path, *segments, *values) if p
    ]
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return clip(text, limit)


_BROKER_SAID = {"ack": "broker ack", "nack": "broker nack", "refused": "refused by the broker"}


def described(status: int | None, kind: str) -> str:
    """An attempt's answer in words: ``HTTP 503``, ``broker ack``, ``no answer (timeout)``."""
    if status is not None:
        return f"HTTP {status}"
    return _BROKER_SAID.get(kind) or f"no answer ({kind or 'error'})"


@dataclass(frozen=True, slots=True)
class Answer:
    """How one HTTP attempt went."""

    status: int | None  # None: no HTTP answer
    # "http", "timeout" or "connection"; from a broker, "ack", "nack" or "refused" too
    kind: str
    error: str  # "" for 2xx
    retry_after: float | None
    seconds: float
    excerpt: str = ""  # a 2xx answer's body, scrubbed, one line, EXCERPT_MAX_CHARS at most
    # A broker's answer has no status: it says itself whether the event was accepted
    # ("ok"), is worth another attempt ("retry") or was refused for good ("reject").
    verdict: Literal["ok", "retry", "reject"] | None = None
    # while tracing is on: the attempt's trace, for the latency histograms' exemplars
    exemplar: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        if self.verdict is not None:
            return self.verdict == "ok"
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        if self.verdict is not None:
            return self.verdict == "retry"
        return retryable(self.status)

    @property
    def said(self) -> str:
        """What the sink answered, for a log line (:func:`described`)."""
        return described(self.status, self.kind)

    def log_record(self, source: str) -> str:
        """This attempt for the event log (``lua/lib/event_log.lua`` adds its number and
        start): JSON, its duration in ms first."""
        return json.dumps(
            {
                "ms": round(self.seconds * 1000),
                "st": self.status,
                "k": self.kind,
                "err": self.error,
                "x": self.excerpt,
                "src": source,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class Request:
    """What the sink is told about the delivery besides the body."""

    tenant: str
    event_id: str
    event_type: str
    attempt: int
    source: str
    trace: str = ""  # the event's stored trace context (relay.telemetry); "" for none


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What every request to one sink shares, made once per configuration."""

    url: URL
    key: bytes | None  # the HMAC key; None: unsigned (no secret, or not usable)
    headers: dict[str, str]  # the sink's own headers that the relay's do not replace
    timeouts: dict[float, aiohttp.ClientTimeout]
    way: egress.Way  # its TLS context and proxy
    token_way: egress.Way | None  # its OAuth2 token endpoint's


_OURS = frozenset(
    h.lower()
    for h in (
        "Content-Type", "User-Agent", "webhook-id", "webhook-timestamp", "webhook-signature",
        "X-Chert-Event-Type", "X-Chert-Tenant", "X-Relay-Attempt", "X-Relay-Source",
    )
)  # fmt: skip
_USER_AGENT = f"chert-relay/{__version__}"
_DIRECT = egress.Way(True, None, None, ())


class SinkClient:
    """POSTs events to sinks over one shared HTTP session; signs with each sink's key."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._signing_keys: dict[str, bytes | None] = {}
        self._prepared: dict[int, tuple[SinkConfig, _Prepared]] = {}
        self.tokens = Tokens(session)

    def forget_keys(self) -> None:
        """Decode sink secrets, load TLS files and read the proxy settings afresh (a
        reload may have changed them), and drop the OAuth2 tokens."""
        self._signing_keys = {}
        self._prepared = {}
        self.tokens.forget()

    async def close(self) -> None:
        await self.tokens.close()

    def signing_key(self, sink: SinkConfig) -> bytes | None:
        """The sink's HMAC key, decoded once per config; None without a usable secret."""
        if sink.secret is None:
            return None
        secret = sink.secret.get()
        if secret not in self._signing_keys:
            try:
                self._signing_keys[secret] = standard_webhooks_key(secret)
            except ValueError:
                self._signing_keys[secret] = None
        return self._signing_keys[secret]

    def _prepare(self, sink: SinkConfig) -> _Prepared:
        found = self._prepared.get(id(sink))
        if found is not None and found[0] is sink:
            return found[1]
        url = URL(sink.url)
        way, token_way = _DIRECT, None  # a broker sink's headers are made here too
        if not sink.is_broker:
            way = egress.way_to(sink, url, os.environ)
        if sink.oauth2 is not None:
            token_way = egress.way_to(sink, URL(sink.oauth2.token_url), os.environ)
        prepared = _Prepared(
            url,
            self.signing_key(sink),
            {k: v for k, v in sink.headers.items() if k.lower() not in _OURS},
            {},
            way,
            token_way,
        )
        self._prepared[id(sink)] = (sink, prepared)  # the sink is kept: its id stays its own
        return prepared

    def headers(self, sink: SinkConfig, req: Request, body: bytes) -> dict[str, str]:
        now = int(time.time())
        p = self._prepare(sink)
        headers = p.headers.copy()
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = _USER_AGENT
        headers["webhook-id"] = req.event_id
        headers["webhook-timestamp"] = str(now)
        headers["X-Chert-Event-Type"] = header_value(req.event_type)
        headers["X-Chert-Tenant"] = req.tenant
        headers["X-Relay-Attempt"] = str(req.attempt)
        headers["X-Relay-Source"] = req.source
        if p.key is not None:
            headers["webhook-signature"] = standard_webhooks_signature(
                p.key, req.event_id, now, body
            )
        return headers

    async def post(
        self,
        sink: SinkConfig,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
    ) -> Answer:
        """POST ``body`` to ``sink``; a 2xx answer's body is kept as its ``excerpt``
        (scrubbed, one line, at most EXCERPT_MAX_CHARS) for the event log and the test
        event's sender. An OAuth2 sink's token is fetched (or reused) first, and
        refreshed once on a 401; all of it within ``timeout``."""
        started = time.perf_counter()
        p = self._prepare(sink)
        if p.way.problem is not None:
            error = scrub(p.way.problem, sink, extra=p.way.secrets)
            return Answer(None, "connection", error, None, time.perf_counter() - started)
        conf, token_way = sink.oauth2, p.token_way
        if conf is None or token_way is None:
            return await self._send(sink, p, body, headers, timeout, started, None)
        bearer = _Bearer(self.tokens, sink, conf, token_way, timeout, started)
        token = await bearer.get()
        if isinstance(token, Answer):
            return token
        answer = await self._send(sink, p, body, headers, timeout, started, token)
        if answer.status != 401:
            return answer
        # The token may have been revoked, or the sink's clock be ahead: one more, once.
        fresh = await bearer.get(stale=token)
        if isinstance(fresh, Answer):
            return fresh
        return await self._send(sink, p, body, headers, timeout, started, fresh)

    async def _send(
        self,
        sink: SinkConfig,
        p: _Prepared,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
        started: float,
        token: str | None,
    ) -> Answer:
        """One POST, in what is left of the attempt's ``timeout``."""
        hidden = (*p.way.secrets, token) if token is not None else p.way.secrets
        try:
            if token is None:
                client_timeout = p.timeouts.get(timeout)
                if client_timeout is None:
                    client_timeout = p.timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
            else:
                left = started + timeout - time.perf_counter()
                if left <= 0:
                    raise TimeoutError
                client_timeout = aiohttp.ClientTimeout(total=left)
                headers = {**headers, "Authorization": f"Bearer {token}"}
            async with self._session.post(
                p.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=client_timeout,
                ssl=p.way.ssl,
                proxy=p.way.proxy,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    raw = await resp.content.read(OK_BODY_READ)  # the connection is reused
                    took = time.perf_counter() - started
                    said = ""
                    if raw and not raw.isspace():
                        text = raw[: 2 * EXCERPT_MAX_CHARS].decode(errors="replace")
                        said = scrub(text, sink, EXCERPT_MAX_CHARS, hidden)
                    return Answer(status, "http", "", None, took, said)
                if status == 407 and p.way.proxy is not None:
                    # Only a proxy answers 407: the sink never saw the request.
                    error = "proxy: HTTP 407, the proxy refused its credentials"
                    error += " (check the proxy's user and proxy_password)"
                    return Answer(None, "connection", error, None, time.perf_counter() - started)
                snippet = ""
                if status not in (401, 403):  # where a sink would echo a credential back
                    # More than is kept, so that scrub() sees any secret whole before
                    # the text is cut to ERROR_MAX_CHARS.
                    raw = await resp.content.read(ERROR_BODY_READ)
                    snippet = raw.decode(errors="replace")
                error = f"HTTP {status}" + (f": {snippet}" if snippet.strip() else "")
                return Answer(
                    status,
                    "http",
                    scrub(error, sink, extra=hidden),
                    parse_retry_after(resp.headers.get("Retry-After")),
                    time.perf_counter() - started,
                )
        except TimeoutError:
            elapsed = time.perf_counter() - started
            # A busy event loop wakes up late: say both the limit and the time it took.
            error = f"no answer within the {timeout:g}s timeout (gave up after {elapsed:.2f}s)"
            return Answer(None, "timeout", error, None, elapsed)
        except (aiohttp.ClientError, OSError, ValueError) as e:
            elapsed = time.perf_counter() - started
            # TLS and the proxy named; a URL's credentials, say, scrubbed
            error = scrub(egress.failure_text(e, sink.url), sink, extra=hidden)
            return Answer(None, "connection", error, None, elapsed)


@dataclass(frozen=True, slots=True)
class _Bearer:
    """The OAuth2 token of one attempt at a sink, inside the attempt's timeout."""

    tokens: Tokens
    sink: SinkConfig
    conf: OAuth2Config
    way: egress.Way
    timeout: float
    started: float

    async def get(self, stale: str | None = None) -> str | Answer:
        """A token other than ``stale``, or the failed attempt."""
        left = self.started + self.timeout - time.perf_counter()
        kind = "connection"
        try:
            if left <= 0:
                raise TimeoutError
            return await self.tokens.get(self.conf, self.way, self.timeout, wait=left, stale=stale)
        except TimeoutError:
            kind, error = "timeout", f"OAuth2: no token within the {self.timeout:g}s timeout"
        except TokenError as e:
            error = f"OAuth2 token endpoint: {e}"
        error = scrub(error, self.sink, extra=self.way.secrets)
        return Answer(None, kind, error, None, time.perf_counter() - self.started)
