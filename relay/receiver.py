"""The webhook receiver: ``POST /webhooks/chert/{tenant}``.

Order of work for each request: known tenant → size → signature → body shape →
tenant match → ingest → answer. Chert never retries a 4xx, so a 4xx is only for
faults no retry can fix; anything transient (Redis down, shutting down) is a 503
with ``Retry-After``. 2xx is sent only once ingest has durably stored the event:
202 for a new event, 200 for one already seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import ClientPayloadError, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter, Gauge

from relay import envelope
from relay.config import Config
from relay.envelope import BadEventError
from relay.errors import RedisUnavailableError, SignatureError
from relay.ingest import Ingestor
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
    accepted: Counter  # this tenant's metric children, looked up once
    duplicate: Counter
    last_webhook: Gauge
    ingested_new: Counter
    ingested_duplicate: Counter


_JSON = "application/json"
_ACCEPTED = b'{"status": "accepted"}'
_DUPLICATE = b'{"status": "duplicate"}'


def _json(
    status: int, payload: dict[str, str], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


class Receiver:
    """Holds the receiver's state; ``app()`` builds its aiohttp application."""

    def __init__(self, config: Config, ingestor: Ingestor, metrics: Metrics) -> None:
        self._ingestor = ingestor
        self._metrics = metrics
        self.draining = False
        self._throttle = Throttle(interval=10.0)
        self._observe = metrics.webhook_seconds.observe
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Switch to a new configuration (new secrets take effect for the next request)."""
        self._config = config
        self._max_body = config.server.max_body_bytes
        self._body_timeout = config.server.body_timeout
        self._retry_after = {"Retry-After": str(config.server.retry_after)}
        self._tenants = {
            t.slug: _Tenant(
                slug=t.slug,
                secrets=tuple(webhook_key(s.get().encode()) for s in t.webhook_secrets),
                tolerance=t.signature_tolerance,
                accepted=self._metrics.webhooks.labels(t.slug, "accepted"),
                duplicate=self._metrics.webhooks.labels(t.slug, "duplicate"),
                last_webhook=self._metrics.last_webhook.labels(t.slug),
                ingested_new=self._metrics.events_ingested.labels(t.slug, "webhook", "new"),
                ingested_duplicate=self._metrics.events_ingested.labels(
                    t.slug, "webhook", "duplicate"
                ),
            )
            for t in config.tenants
        }

    def server(self) -> web.Server:
        """The receiver as an aiohttp low-level server.

        One route needs no router: the path is matched here, which takes aiohttp's
        application layer (router, middleware chain, signals) off every webhook.
        """
        return web.Server(self.handle, request_factory=self._make_request, access_log=None)

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, asyncio.get_running_loop(),
            client_max_size=self._max_body,
        )  # fmt: skip

    def _reject(
        self, status: int, tenant: str, reason: str, detail: str, request: web.BaseRequest,
        started: float,
    ) -> web.Response:  # fmt: skip
        self._metrics.webhook_rejections.labels(tenant, reason).inc()
        outcome = {503: "unavailable", 500: "error"}.get(status, "rejected")
        self._metrics.webhooks.labels(tenant, outcome).inc()
        suppressed = self._throttle.allow((tenant, reason))
        if suppressed is not None:
            log.warning(
                "webhook refused: tenant=%s status=%d reason=%s remote=%s: %s%s",
                tenant, status, reason, request.remote, detail,
                f" ({suppressed} more like it since the last line)" if suppressed else "",
            )  # fmt: skip
        headers = self._retry_after if status == 503 else None
        self._observe(time.perf_counter() - started)
        return _json(status, {"error": reason, "message": detail}, headers)

    async def handle(self, request: web.BaseRequest) -> web.Response:
        path = request.path
        slug = path[len(PATH_PREFIX) :]
        if not path.startswith(PATH_PREFIX) or not slug or "/" in slug:
            return _json(404, {"error": "not_found", "message": f"POST {ROUTE} only"})
        if request.method != "POST":
            return _json(
                405, {"error": "method_not_allowed", "message": "POST only"}, {"Allow": "POST"}
            )
        # One coroutine, no helpers awaited but the body read and the ingest: every
        # extra frame on this path costs throughput.
        started = time.perf_counter()
        tenant = self._tenants.get(slug)
        if tenant is None:
            # The label is fixed: a path segment chosen by the caller never becomes one.
            return self._reject(
                404, "unknown", "unknown_tenant", "no such tenant", request, started
            )
        try:
            if self.draining:
                return self._reject(
                    503, slug, "draining", "the relay is shutting down", request, started
                )

            length = request.content_length
            if length is not None and length > self._max_body:
                return self._reject(
                    413, slug, "body_too_large", f"body exceeds {self._max_body} bytes", request,
                    started,
                )  # fmt: skip
            if "Expect" in request.headers:
                # No router here to answer it: a client that asks waits for this line.
                if request.headers["Expect"].lower() != "100-continue":
                    return self._reject(
                        417, slug, "bad_expect", "only Expect: 100-continue is understood", request,
                        started,
                    )  # fmt: skip
                if request.version >= HttpVersion11:
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.writer.output_size = 0
            try:
                content = request.content
                if content.is_eof():  # all of it is here (the usual case): take it as is
                    body = content.read_nowait()
                    if len(body) > self._max_body:  # chunked, so no Content-Length
                        raise web.HTTPRequestEntityTooLarge(self._max_body, len(body))
                else:
                    async with asyncio.timeout(self._body_timeout):
                        body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._reject(
                    413, slug, "body_too_large", f"body exceeds {self._max_body} bytes", request,
                    started,
                )  # fmt: skip
            except TimeoutError:
                # Slow or stalled: the sender may well succeed on a retry.
                detail = f"the body did not arrive within {self._body_timeout:g}s"
                return self._reject(503, slug, "body_timeout", detail, request, started)
            except (ConnectionError, HttpProcessingError, ClientPayloadError):
                # The sender went away mid-body: nobody reads the answer.
                detail = "the connection closed before the body was complete"
                return self._reject(400, slug, "client_disconnected", detail, request, started)

            headers = request.headers
            try:
                verify_webhook(headers, body, tenant.secrets, tolerance=tenant.tolerance)
            except SignatureError as e:
                return self._reject(
                    401, slug, _SIGNATURE_REASONS[e.reason], str(e), request, started
                )

            try:
                event = envelope.from_body(
                    body,
                    header_event_id=headers.get("X-Webhook-Event-Id"),
                    header_type=headers.get("X-Webhook-Event"),
                )
            except BadEventError as e:
                return self._reject(400, slug, e.reason, str(e), request, started)
            if event.partner_id is not None and event.partner_id != slug:
                reason, detail = "tenant_mismatch", "partner_id names another tenant"
                return self._reject(403, slug, reason, detail, request, started)

            tenant.last_webhook.set(time.time())
            try:
                new = await self._ingestor.submit(slug, event, "webhook")
            except RedisUnavailableError as e:
                return self._reject(503, slug, "redis_unavailable", str(e), request, started)
            if new:
                tenant.ingested_new.inc()
                tenant.accepted.inc()
                response = web.Response(status=202, body=_ACCEPTED, content_type=_JSON)
            else:
                tenant.ingested_duplicate.inc()
                tenant.duplicate.inc()
                response = web.Response(status=200, body=_DUPLICATE, content_type=_JSON)
        except Exception:
            # A bug, not the sender's fault: Chert retries a 5xx, so nothing is lost.
            log.exception("webhook handler failed: tenant=%s", slug)
            return self._reject(
                500, slug, "internal_error", "the relay failed to handle the webhook", request,
                started,
            )  # fmt: skip
        self._observe(time.perf_counter() - started)
        return response
