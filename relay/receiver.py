"""The webhook receiver: ``POST /webhooks/chert/{tenant}``.

Order of work for each request: known tenant → size → signature → body shape →
tenant match → ingest → answer. Chert never retries a 4xx, so a 4xx is only for
faults no retry can fix; anything transient (Redis down, shutting down) is a 503
with ``Retry-After``. 2xx is sent only once ingest has durably stored the event:
202 for a new event, 200 for one already seen.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter, Gauge

from relay import envelope
from relay.config import Config
from relay.envelope import BadEventError
from relay.errors import RedisUnavailableError, SignatureError
from relay.ingest import Ingestor
from relay.logs import Throttle
from relay.metrics import Metrics
from relay.signing import verify_webhook, webhook_key

log = logging.getLogger(__name__)

ROUTE = "/webhooks/chert/{tenant}"

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
    secrets: tuple[hmac.HMAC, ...]
    tolerance: float
    accepted: Counter  # this tenant's metric children, looked up once
    duplicate: Counter
    last_webhook: Gauge


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
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Switch to a new configuration (new secrets take effect for the next request)."""
        self._config = config
        self._max_body = config.server.max_body_bytes
        self._retry_after = {"Retry-After": str(config.server.retry_after)}
        self._tenants = {
            t.slug: _Tenant(
                slug=t.slug,
                secrets=tuple(webhook_key(s.get().encode()) for s in t.webhook_secrets),
                tolerance=t.signature_tolerance,
                accepted=self._metrics.webhooks.labels(t.slug, "accepted"),
                duplicate=self._metrics.webhooks.labels(t.slug, "duplicate"),
                last_webhook=self._metrics.last_webhook.labels(t.slug),
            )
            for t in config.tenants
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(ROUTE, self.handle)
        return app

    def _reject(
        self, status: int, tenant: str, reason: str, detail: str, request: web.Request
    ) -> web.Response:
        self._metrics.webhook_rejections.labels(tenant, reason).inc()
        outcome = "unavailable" if status == 503 else "rejected"
        self._metrics.webhooks.labels(tenant, outcome).inc()
        suppressed = self._throttle.allow((tenant, reason))
        if suppressed is not None:
            log.warning(
                "webhook refused: tenant=%s status=%d reason=%s remote=%s: %s%s",
                tenant, status, reason, request.remote, detail,
                f" ({suppressed} more like it since the last line)" if suppressed else "",
            )  # fmt: skip
        headers = self._retry_after if status == 503 else None
        return _json(status, {"error": reason, "message": detail}, headers)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._handle(request)
        finally:
            self._metrics.webhook_seconds.observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        tenant = self._tenants.get(request.match_info["tenant"])
        if tenant is None:
            # The label is fixed: a path segment chosen by the caller never becomes one.
            return self._reject(404, "unknown", "unknown_tenant", "no such tenant", request)
        slug = tenant.slug
        if self.draining:
            return self._reject(503, slug, "draining", "the relay is shutting down", request)

        length = request.content_length
        if length is not None and length > self._max_body:
            return self._reject(
                413, slug, "body_too_large", f"body exceeds {self._max_body} bytes", request
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(
                413, slug, "body_too_large", f"body exceeds {self._max_body} bytes", request
            )

        headers = request.headers
        try:
            verify_webhook(headers, body, tenant.secrets, tolerance=tenant.tolerance)
        except SignatureError as e:
            return self._reject(401, slug, _SIGNATURE_REASONS[e.reason], str(e), request)

        try:
            event = envelope.from_body(
                body,
                header_event_id=headers.get("X-Webhook-Event-Id"),
                header_type=headers.get("X-Webhook-Event"),
            )
        except BadEventError as e:
            return self._reject(400, slug, e.reason, str(e), request)
        if event.partner_id is not None and event.partner_id != slug:
            return self._reject(
                403, slug, "tenant_mismatch", "partner_id names another tenant", request
            )

        tenant.last_webhook.set(time.time())
        try:
            new = await self._ingestor.ingest(slug, event, "webhook")
        except RedisUnavailableError as e:
            return self._reject(503, slug, "redis_unavailable", str(e), request)
        if new:
            tenant.accepted.inc()
            return web.Response(status=202, body=_ACCEPTED, content_type="application/json")
        tenant.duplicate.inc()
        return web.Response(status=200, body=_DUPLICATE, content_type="application/json")
