"""The webhook receiver: ``POST /webhooks/chert/{tenant}``.

Order of work for each request: known tenant → size → signature → body shape →
tenant match → ingest → answer. Chert never retries a 4xx, so a 4xx is only for
faults no retry can fix; anything transient (Redis down, shutting down) is a 503
with ``Retry-After``. 2xx is sent only once ingest has durably stored the event:
202 for a new event, 200 for one already seen.

The HTTP side is :mod:`relay.edge.http_server`; this module is what the receiver
decides, in the three steps that server calls: the head, a body that could not be
read, and the whole request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from prometheus_client import Counter, Gauge

from relay import telemetry
from relay.config import Config
from relay.edge import decoding
from relay.edge.http_server import HttpServer
from relay.edge.http_types import Pending, Response
from relay.errors import RedisUnavailableError, SignatureError
from relay.ingest import envelope
from relay.ingest.envelope import BadEventError, HeadReader
from relay.ingest.ingestor import Ingestor
from relay.logs import Throttle
from relay.metrics import Metrics
from relay.signing import WebhookKey, verify_webhook, webhook_key

log = logging.getLogger(__name__)

ROUTE = "/webhooks/chert/{tenant}"
PATH_PREFIX = "/webhooks/chert/"

# Metric reason labels for signature failures (SignatureError.reason → label).
_SIGNATURE_REASONS = {
    "missing": "missing_signature",
    "malformed": "malformed_signature",
    "stale": "stale_timestamp",
    "future": "future_timestamp",
    "mismatch": "bad_signature",
}


@dataclass(frozen=True, slots=True)
class _Tenant:
    slug: str
    secrets: tuple[WebhookKey, ...]
    tolerance: float
    accept_compressed: bool
    accepted: Counter  # this tenant's metric children, looked up once
    duplicate: Counter
    ingested_new: Counter
    ingested_duplicate: Counter
    skew: Gauge  # how old Chert's signed timestamps are as they arrive
    reader: HeadReader | None  # sinks filter by fields: a parse that builds those too


_ACCEPTED = Response(202, b'{"status": "accepted"}')
_DUPLICATE = Response(200, b'{"status": "duplicate"}')
_ALLOW = (("Allow", "POST"),)
_VERSIONS = (HttpVersion11, HttpVersion10)
_TOO_MANY_CONNECTIONS = Response(
    503, b'{"error": "too_many_connections", "message": "try again later"}'
)
_LIMIT_ACTIONS = {
    "refused": "refused a new connection (503): every open one is busy",
    "idle_closed": "closed the longest-idle connection to admit a new one",
    "slow_closed": "closed the longest-stalled sender (a request still arriving after 1 s) "
    "to admit a new one",
}


@dataclass(slots=True)
class _Request:
    """What the receiver knows of a webhook between the steps."""

    slug: str  # the tenant's metric label ("unknown" for an unknown tenant)
    tenant: _Tenant | None
    started: float
    remote: str | None
    coding: str | None = None  # the body's content coding (a tenant that accepts them)
    span: Any = None  # its span while tracing is on (relay.telemetry)


class Receiver:
    """Holds the receiver's state and decides each webhook; ``server()`` serves it."""

    def __init__(self, config: Config, ingestor: Ingestor, metrics: Metrics) -> None:
        self._ingestor = ingestor
        self._metrics = metrics
        self.draining = False
        self._throttle = Throttle(interval=10.0)
        self._observe = metrics.webhook_seconds.observe
        self._server: HttpServer | None = None
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Switch to a new configuration (new secrets take effect for the next request)."""
        self._config = config
        self._metrics.prepare_receiver(config)
        self._max_body = config.server.max_body_bytes
        self._body_timeout = config.server.body_timeout
        self._retry_after = (("Retry-After", str(config.server.retry_after)),)
        self._tenants = {
            t.slug: _Tenant(
                slug=t.slug,
                secrets=tuple(webhook_key(s.get().encode()) for s in t.webhook_secrets),
                tolerance=t.signature_tolerance,
                accept_compressed=t.accept_compressed,
                accepted=self._metrics.webhooks.labels(t.slug, "accepted"),
                duplicate=self._metrics.webhooks.labels(t.slug, "duplicate"),
                ingested_new=self._metrics.events_ingested.labels(t.slug, "webhook", "new"),
                ingested_duplicate=self._metrics.events_ingested.labels(
                    t.slug, "webhook", "duplicate"
                ),
                skew=self._metrics.webhook_timestamp_age.labels(t.slug),
                reader=envelope.reader_for(
                    path for s in t.sinks if s.filter is not None for path in s.filter.paths
                ),
            )
            for t in config.tenants
        }
        if self._server is not None:
            self._configure(self._server)

    def _configure(self, server: HttpServer) -> None:
        cfg, state = self._config.server, server.state
        state.max_body = self._max_body
        state.body_timeout = self._body_timeout
        state.keepalive_timeout = cfg.keepalive_timeout
        state.max_connections = cfg.max_connections
        state.max_body_memory = cfg.body_memory

    def server(self) -> HttpServer:
        """The receiver's HTTP server (not yet listening: ``await server.start(listen)``)."""
        if self._server is None:
            server = HttpServer(self, max_body=self._max_body, body_timeout=self._body_timeout)
            self._configure(server)
            self._metrics.receiver_connections.set_function(lambda: server.open_connections)
            self._server = server
        return self._server

    def _reject(self, status: int, reason: str, detail: str, req: _Request) -> Response:
        tenant = req.slug
        self._metrics.webhook_rejections.labels(tenant, reason).inc()
        outcome = {503: "unavailable", 500: "error"}.get(status, "rejected")
        self._metrics.webhooks.labels(tenant, outcome).inc()
        suppressed = self._throttle.allow((tenant, reason))
        if suppressed is not None:
            log.warning(
                "webhook refused: tenant=%s status=%d reason=%s remote=%s: %s%s",
                tenant,
                status,
                reason,
                req.remote,
                detail,
                f" ({suppressed} more like it since the last line)" if suppressed else "",
            )
        if req.span is None:
            self._observe(time.perf_counter() - req.started)
        else:
            self._traced_end(req, status, outcome, reason)
        body = json.dumps({"error": reason, "message": detail}).encode()
        return Response(status, body, self._retry_after if status == 503 else ())

    # --- the three steps relay.edge.http_server calls ----------------------------------

    def head(self, msg: RawRequestMessage, remote: str | None) -> Response | _Request:
        """The request line and headers: a refusal now, or what the next steps need."""
        if msg.version not in _VERSIONS:
            # aiohttp's parser reads "POST /x" (no version) as HTTP/0.9, headers and
            # body all the same, and takes "HTTP/2.0": neither is a webhook over HTTP/1.
            req = _Request("unknown", None, time.perf_counter(), remote)
            return self._reject(505, "bad_request_line", "HTTP/1.0 and HTTP/1.1 only", req)
        path = msg.url.path
        slug = path[len(PATH_PREFIX) :]
        started = time.perf_counter()
        if not path.startswith(PATH_PREFIX) or not slug or "/" in slug:
            req = _Request("unknown", None, started, remote)
            return self._reject(404, "not_found", f"POST {ROUTE} only", req)
        tenant = self._tenants.get(slug)
        if msg.method != "POST":
            req = _Request("unknown" if tenant is None else slug, None, started, remote)
            refused = self._reject(405, "method_not_allowed", "POST only", req)
            return refused._replace(headers=_ALLOW)
        if tenant is None:
            # The label is fixed: a path segment chosen by the caller never becomes one.
            req = _Request("unknown", None, started, remote)
            return self._reject(404, "unknown_tenant", "no such tenant", req)
        req = _Request(slug, tenant, started, remote)
        tracer = telemetry.TRACER
        if tracer is not None:
            req.span = tracer.webhook(slug, started)
        if self.draining:
            return self._reject(503, "draining", "the relay is shutting down", req)
        length = msg.headers.get("Content-Length")
        if length is not None and int(length) > self._max_body:
            detail = f"body exceeds {self._max_body} bytes"
            return self._reject(413, "body_too_large", detail, req)
        coding = msg.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # The parser takes "gzip, chunked" and reads the chunks, undecoded.
            detail = "only Transfer-Encoding: chunked is understood"
            return self._reject(501, "bad_transfer_encoding", detail, req)
        expect = msg.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            detail = "only Expect: 100-continue is understood"
            return self._reject(417, "bad_expect", detail, req)
        coding = decoding.coding_of(msg.headers.get("Content-Encoding"))
        if coding is not None:
            return self._compressed(req, tenant, coding)
        return req

    def _compressed(self, req: _Request, tenant: _Tenant, coding: str) -> Response | _Request:
        """A compressed body: refused here, before a byte of it is decoded, unless the
        tenant accepts them (Chert sends bodies uncompressed); see
        :mod:`relay.edge.decoding`."""
        if not tenant.accept_compressed:
            detail = (
                "Content-Encoding is not accepted: Chert sends bodies uncompressed "
                "(set accept_compressed = true for this tenant to allow gzip and deflate)"
            )
            return self._reject(415, "unsupported_content_encoding", detail, req)
        if coding not in decoding.CODINGS:
            detail = "only Content-Encoding gzip or deflate is understood"
            return self._reject(415, "unsupported_content_encoding", detail, req)
        req.coding = coding
        return req

    def body_failed(self, req: _Request, status: int, reason: str, detail: str) -> Response:
        """The body could not be read (too large, too slow, the sender gone)."""
        return self._reject(status, reason, detail, req)

    def failed(self, req: _Request | None, error: BaseException) -> Response:
        """A failure inside the relay (a bug): Chert retries a 5xx, so nothing is lost."""
        tenant = req.slug if req is not None else "-"
        log.error("webhook handler failed: tenant=%s", tenant, exc_info=error)
        if req is None:
            return Response(500, b'{"error": "internal_error"}')
        detail = "the relay failed to handle the webhook"
        return self._reject(500, "internal_error", detail, req)

    def refused(self, reason: str, detail: str, remote: str | None) -> Response:
        """A request the HTTP parser refused (its tenant unread): 400, counted as
        ``tenant="unknown"``."""
        req = _Request("unknown", None, time.perf_counter(), remote)
        return self._reject(400, reason, detail, req)

    def connection_refused(self, remote: str | None) -> Response:
        """A connection past ``server.max_connections`` while every open one is busy: 503,
        which Chert retries."""
        self._log_limit("refused", remote)
        return _TOO_MANY_CONNECTIONS._replace(headers=self._retry_after)

    def idle_connection_closed(self) -> None:
        self._log_limit("idle_closed", None)

    def slow_connection_closed(self, remote: str | None) -> None:
        self._log_limit("slow_closed", remote)

    def _log_limit(self, action: str, remote: str | None) -> None:
        self._metrics.receiver_connection_limit.labels(action).inc()
        suppressed = self._throttle.allow(("max_connections", action))
        if suppressed is not None:
            log.warning(
                "receiver at server.max_connections (%d): %s, remote=%s%s",
                self._config.server.max_connections,
                _LIMIT_ACTIONS[action],
                remote,
                f" ({suppressed} more like it since the last line)" if suppressed else "",
            )

    def handle(self, req: _Request, msg: RawRequestMessage, body: bytes) -> Response | Pending:
        """The whole webhook: verify, parse, then ingest (the answer waits for it)."""
        tenant = req.tenant
        assert tenant is not None
        headers = msg.headers
        if req.coding is not None:
            try:
                body = decoding.decode(body, req.coding, self._max_body)
            except decoding.TooLarge as e:
                detail = f"{e} (at most {decoding.MAX_INFLATE}x what was sent)"
                return self._reject(413, "body_too_large", detail, req)
            except decoding.Undecodable as e:
                return self._reject(400, "malformed_body", str(e), req)
        try:
            tenant.skew.set(
                verify_webhook(headers, body, tenant.secrets, tolerance=tenant.tolerance)
            )
        except SignatureError as e:
            if e.skew is not None:
                tenant.skew.set(e.skew)
            return self._reject(401, _SIGNATURE_REASONS[e.reason], str(e), req)
        try:
            event = envelope.from_body(
                body, header_type=headers.get("X-Webhook-Event"), reader=tenant.reader
            )
        except BadEventError as e:
            return self._reject(400, e.reason, str(e), req)
        if event.partner_id is not None and event.partner_id != tenant.slug:
            return self._reject(403, "tenant_mismatch", "partner_id names another tenant", req)
        done = functools.partial(self._ingested, req)
        tracer = telemetry.TRACER
        if req.span is None or tracer is None:
            return self._ingestor.submit(tenant.slug, event, "webhook"), done
        trace = tracer.webhook_event(req.span, event)
        return self._ingestor.submit(tenant.slug, event, "webhook", trace), done

    def _ingested(self, req: _Request, future: asyncio.Future[Any]) -> Response:
        tenant = req.tenant
        assert tenant is not None
        try:
            new = future.result()
        except RedisUnavailableError as e:
            return self._reject(503, "redis_unavailable", str(e), req)
        if new:
            tenant.ingested_new.inc()
            tenant.accepted.inc()
            response = _ACCEPTED
        else:
            tenant.ingested_duplicate.inc()
            tenant.duplicate.inc()
            response = _DUPLICATE
        if req.span is None:
            self._observe(time.perf_counter() - req.started)
        else:
            self._traced_end(req, response.status, "accepted" if new else "duplicate")
        return response

    def _traced_end(self, req: _Request, status: int, outcome: str, reason: str = "") -> None:
        """End a traced webhook: its span, and its latency with the trace as exemplar."""
        tracer = telemetry.TRACER
        if tracer is None:  # stopped meanwhile
            self._observe(time.perf_counter() - req.started)
            return
        self._observe(time.perf_counter() - req.started, tracer.exemplar(req.span))
        tracer.webhook_end(req.span, status, outcome, reason)
