"""The simulated events API (chert-contract.md §1, §4, §6): auth, errors, listings, replay.

Every ``/api/v1`` request is recorded as an :class:`ApiRequest`, may be answered
by an injected fault (429/1007 with ``retry_after``, or 500/3001) before anything
else, and is then authenticated: ``authorization: Bearer <api secret>``, or
``x-chert-tenant`` plus ``x-chert-signature: v1,<ts>,<hex>`` over
``"<ts>." + body`` within ±300 s, compared in constant time. Errors use Chert's
envelope and carry ``X-Trace-ID``. The SSE route lives in :mod:`stream`.
"""

from __future__ import annotations

import hmac
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.errors import RelayError
from relay.signing import chert_digest
from relay.simulator.eventlog import EventLog, QueryError, parse_query
from relay.simulator.models import ApiRequest, Faults, SimTenant
from relay.simulator.pusher import WebhookPusher

PREFIX = "/api/v1"
SIGNATURE_TOLERANCE = 300
TRACE_ID = web.RequestKey("trace_id", str)
RECORD = web.RequestKey("api_request", ApiRequest)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(RelayError):
    """An error answer in Chert's envelope."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after

    def response(self, trace_id: str) -> web.Response:
        error: dict[str, Any] = {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        headers = {"X-Trace-ID": trace_id}
        if self.retry_after is not None:
            whole = float(self.retry_after).is_integer()
            error["retry_after"] = int(self.retry_after) if whole else self.retry_after
            headers["Retry-After"] = str(max(0, math.ceil(self.retry_after)))
        body = {"success": False, "error": error, "trace_id": trace_id}
        return web.json_response(body, status=self.status, headers=headers)


class EventsApi:
    """Handlers and middleware of the events API over the simulator's state."""

    def __init__(
        self,
        *,
        tenants: dict[str, SimTenant],
        log: EventLog,
        pusher: WebhookPusher,
        faults: Faults,
        rng: random.Random,
        requests: list[ApiRequest],
    ) -> None:
        self._tenants = tenants
        self._log = log
        self._pusher = pusher
        self._faults = faults
        self._rng = rng
        self.requests = requests

    # --- middleware: record, faults, error envelope ----------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX + "/") and request.path != PREFIX:
            return await handler(request)
        record = ApiRequest(
            request.method,
            request.path,
            dict(request.query),
            time.time(),
            tenant=self._claimed_tenant(request),
        )
        self.requests.append(record)
        trace_id = f"{self._rng.getrandbits(128):032x}"
        request[TRACE_ID] = trace_id
        request[RECORD] = record
        try:
            self._injected_fault()
            response = await handler(request)
        except ApiError as e:
            record.code = e.code
            response = e.response(trace_id)
        except web.HTTPException as e:
            code = 1004 if e.status == 404 else 1005 if e.status == 405 else 1000
            record.code = code
            response = ApiError(e.status, code, e.reason).response(trace_id)
        if record.status == 0:
            record.status = response.status
        if not response.prepared:
            response.headers["X-Trace-ID"] = trace_id
        return response

    def _injected_fault(self) -> None:
        faults = self._faults
        if faults.api_429 > 0:
            faults.api_429 -= 1
            raise ApiError(
                429,
                1007,
                "rate limit exceeded; retry later",
                retryable=True,
                retry_after=faults.api_retry_after,
            )
        if faults.api_500 > 0:
            faults.api_500 -= 1
            raise ApiError(500, 3001, "internal error", retryable=True)

    # --- authentication ----------------------------------------------------------------

    def _claimed_tenant(self, request: web.Request) -> str | None:
        slug = request.headers.get("x-chert-tenant")
        if slug:
            return slug
        token = _bearer_token(request)
        if token:
            for tenant in self._tenants.values():
                if hmac.compare_digest(token.encode(), tenant.api_secret.encode()):
                    return tenant.slug
        return None

    def authenticate(self, request: web.Request, body: bytes = b"") -> SimTenant:
        """The tenant the request is authenticated as; raises :class:`ApiError`."""
        tenant = self._authenticate(request, body)
        request[RECORD].tenant = tenant.slug
        return tenant

    def _authenticate(self, request: web.Request, body: bytes) -> SimTenant:
        slug = request.headers.get("x-chert-tenant")
        signature = request.headers.get("x-chert-signature")
        authorization = request.headers.get("authorization")
        if signature is not None:
            if not slug:
                raise ApiError(401, 2012, "x-chert-signature needs x-chert-tenant")
            tenant = self._tenant(slug)
            parts = signature.split(",")
            if (
                len(parts) != 3
                or parts[0] != "v1"
                or not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 12)
                or len(parts[2]) != 64
            ):
                raise ApiError(401, 2004, "x-chert-signature is not 'v1,<ts>,<hex>'")
            try:
                given = bytes.fromhex(parts[2])
            except ValueError:
                raise ApiError(401, 2004, "x-chert-signature is not hex") from None
            timestamp = int(parts[1])
            if abs(time.time() - timestamp) > SIGNATURE_TOLERANCE:
                raise ApiError(401, 2013, "signature timestamp is outside ±300 s")
            expected = chert_digest(tenant.api_secret.encode(), timestamp, body)
            if not hmac.compare_digest(expected, given):
                raise ApiError(401, 2004, "signature does not match")
            return tenant
        if authorization is not None:
            token = _bearer_token(request)
            if not token:
                raise ApiError(401, 2004, "authorization is not 'Bearer <api secret>'")
            if slug:
                tenant = self._tenant(slug)
                if not hmac.compare_digest(token.encode(), tenant.api_secret.encode()):
                    raise ApiError(401, 2004, "bearer token does not match")
                return tenant
            found: SimTenant | None = None
            for candidate in self._tenants.values():
                if hmac.compare_digest(token.encode(), candidate.api_secret.encode()):
                    found = candidate
            if found is None:
                raise ApiError(401, 2004, "bearer token does not match any tenant")
            return found
        raise ApiError(401, 2012, "missing credentials: authorization or x-chert-signature")

    def _tenant(self, slug: str) -> SimTenant:
        tenant = self._tenants.get(slug)
        if tenant is None:
            raise ApiError(404, 2001, "tenant not found")
        return tenant

    # --- handlers ------------------------------------------------------------------------

    async def list_events(self, request: web.Request) -> web.StreamResponse:
        tenant = self.authenticate(request)
        try:
            query = parse_query(dict(request.query))
        except QueryError as e:
            raise ApiError(400, 1001, str(e)) from None
        page, cursor = self._log.page(tenant.slug, query)
        rows = [e.row for e in page]
        return _json_rows(
            request, {"success": True, "events": rows, "next_cursor": cursor, "count": len(rows)}
        )

    async def get_event(self, request: web.Request) -> web.StreamResponse:
        tenant = self.authenticate(request)
        entry = self._log.get(tenant.slug, request.match_info["id"])
        if entry is None:
            raise ApiError(404, 2011, "event not found")
        return _json_rows(request, entry.row)

    async def replay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        tenant = self.authenticate(request, body)
        entry = self._log.get(tenant.slug, request.match_info["id"])
        if entry is None:
            raise ApiError(404, 2011, "event not found")
        subscription = request.query.get("subscription_id")
        if tenant.webhook_url is None or (subscription and subscription != tenant.subscription_id):
            raise ApiError(400, 1002, "no webhook destination to replay to")
        result = await self._pusher.replay(entry)
        if result is None or not result.delivered:
            if result is None:
                why = "webhooks are disabled"
            elif result.status is not None:
                why = f"destination answered {result.status}"
            else:
                why = str(result.error)
            raise ApiError(502, 3004, f"delivery failed: {why}", retryable=True)
        return _json_rows(
            request,
            {
                "success": True,
                "id": entry.log_id,
                "event_id": entry.event_id,
                "delivery": entry.row["delivery"],
            },
        )


def _bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _json_rows(request: web.Request, body: dict[str, Any]) -> web.Response:
    # Serialized now: rows are live and change as deliveries progress.
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"X-Trace-ID": request[TRACE_ID]},
    )
