"""A client for Chert's events API (chert-contract.md §1, §4-6), one per tenant.

Every call is authenticated the tenant's way — ``authorization: Bearer <secret>``,
or HMAC (``x-chert-tenant`` + ``x-chert-signature: v1,<ts>,<hex>``) signed afresh
for each request and each retry, so a retry never carries a stale timestamp.

Errors come back as Chert's envelope ``{"success": false, "error": {"status",
"code", "message", "retryable", "retry_after"}, "trace_id"}`` and become a
:class:`ChertApiError`. The client branches on ``retryable``: it waits what Chert
asked (``retry_after`` or a ``Retry-After`` header) or else backs off
exponentially with jitter, up to ``api.max_attempts`` tries per call. A wait Chert
asked for is kept as a pause for the whole client: no call to Chert — from any
task sharing it — leaves before the pause ends, even after the call gave up.

A credentials failure is never retried here. If the signing secret comes from a
``file:`` and that file now holds a different secret (a rotation written to disk),
the client re-reads it and tries once more; otherwise the caller decides how long
to wait (the poller slows right down). A reload (SIGHUP) swaps the tenant's
configuration in with :meth:`ChertApi.set_tenant`.

Paging (:meth:`ChertApi.events`) ends only when Chert answers ``next_cursor: null``.
A broken cursor chain — a cursor Chert already gave in this chain — raises
:class:`ChertPagingError` after the pages read so far: the caller must not take the
rows it has as the whole window (the poller then keeps its watermark, and backfill
reports the range as incomplete).

Every request's wait for Chert's response headers is bounded by ``api.timeout``,
stream or not, so a server that accepts the connection and never answers cannot
hold a caller forever; a stream's body is then read without a deadline (the SSE
reader's idle timeout watches for silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from relay.config import TenantConfig
from relay.config.values import Secret, resolve_secret
from relay.errors import ChertApiError, ChertUnreachableError, UpstreamError
from relay.signing import api_request_headers

if TYPE_CHECKING:
    from relay.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
MAX_RETRY_AFTER_S = 3600.0  # a longer wait than this from Chert is taken as an hour
MAX_PAGES_PER_WINDOW = 10_000  # a window paging on past this is given up (and repeats)
_RETRYABLE_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``GET /events``: log rows (as decoded JSON) and the next cursor."""

    rows: list[dict[str, Any]]
    next_cursor: str | None
    trace_id: str | None = None  # Chert's X-Trace-ID for it


class ChertPagingError(UpstreamError):
    """Chert's cursor chain for one ``GET /events`` query broke (a cursor came back again).

    The pages already read were yielded; the rest of the window was never read, so
    whoever pages must treat the window as failed, not as complete.
    """


def isoformat(unix_seconds: float) -> str:
    """``2026-04-29T18:15:25.123456Z`` for Chert's ``since``."""
    dt = datetime.fromtimestamp(unix_seconds, UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _retry_after_header(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_error(status: int, headers: Any, body: bytes) -> ChertApiError:
    """A :class:`ChertApiError` from an error answer, envelope or not."""
    code = 0
    message = f"HTTP {status}"
    retryable = status in _RETRYABLE_STATUSES or status >= 500
    retry_after: float | None = None
    trace_id = headers.get("X-Trace-ID") if headers is not None else None
    try:
        obj = json.loads(body) if body else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            raw_code = err.get("code")
            text = str(raw_code) if isinstance(raw_code, int | str) else ""
            if text.isascii() and text.isdigit() and len(text) <= 9:
                code = int(text)
            if isinstance(err.get("message"), str):
                message = err["message"][:200]
            if isinstance(err.get("retryable"), bool):
                retryable = err["retryable"]
            ra = err.get("retry_after")
            if isinstance(ra, int | float) and not isinstance(ra, bool) and ra >= 0:
                retry_after = float(min(ra, MAX_RETRY_AFTER_S))  # an int may exceed a float
        if isinstance(obj.get("trace_id"), str):
            trace_id = obj["trace_id"]
    if retry_after is None and headers is not None:
        retry_after = _retry_after_header(headers.get("Retry-After"))
    if retry_after is not None:
        retry_after = min(retry_after, MAX_RETRY_AFTER_S)
    return ChertApiError(
        status, code, message, retryable=retryable, retry_after=retry_after, trace_id=trace_id
    )


def _outcome(err: UpstreamError) -> str:
    if isinstance(err, ChertUnreachableError):
        return "unreachable"
    assert isinstance(err, ChertApiError)
    if err.status == 429:
        return "rate_limited"
    if err.is_auth:
        return "auth"
    return "error"


class ChertApi:
    """Calls to Chert for one tenant. Cheap; shares the caller's ``aiohttp`` session."""

    def __init__(
        self,
        tenant: TenantConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._paused_until = 0.0  # monotonic; no call leaves before it
        self._secret_override: Secret | None = None
        self.set_tenant(tenant)

    def set_tenant(self, tenant: TenantConfig) -> None:
        """Use a new configuration for this tenant (reload); applies to the next request."""
        self.tenant = tenant
        self.slug = tenant.slug
        self._secret_override = None

    # --- authentication ----------------------------------------------------------------

    def _secret(self) -> str:
        secret = self._secret_override or self.tenant.api.signing_secret
        if secret is None:
            raise ChertApiError(0, 0, "api.signing_secret is not configured", retryable=False)
        return secret.get()

    def _auth_headers(self) -> dict[str, str]:
        if self.tenant.api.auth == "bearer":
            return {"authorization": f"Bearer {self._secret()}", "x-chert-tenant": self.slug}
        return api_request_headers(self.slug, self._secret())

    def _reread_secret(self) -> bool:
        """Re-read a ``file:`` secret after an auth failure; True if it changed."""
        current = self._secret_override or self.tenant.api.signing_secret
        if current is None or not current.origin.startswith("file:"):
            return False
        try:
            fresh = resolve_secret(current.origin)
        except ValueError as e:
            log.warning("tenant %s: cannot re-read the API signing secret: %s", self.slug, e)
            return False
        if fresh == current:
            return False
        log.info("tenant %s: API signing secret changed on disk; using the new one", self.slug)
        self._secret_override = fresh
        return True

    # --- the request loop ----------------------------------------------------------------

    def pause_remaining(self) -> float:
        """Seconds until Chert's last ``retry_after`` ends (0 when no pause is on)."""
        return max(0.0, self._paused_until - time.monotonic())

    def _backoff(self, attempt: int) -> float:
        cap = min(self.tenant.api.max_backoff, BACKOFF_BASE_S * 2.0 ** (attempt - 1))
        return cap * (0.5 + random.random() / 2)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.poll_requests.labels(self.slug, outcome).inc()

    async def _request(
        self, path: str, params: dict[str, str | int | None], *, stream: bool = False
    ) -> aiohttp.ClientResponse:
        """GET ``path`` with retries; returns a 2xx response the caller must release."""
        api = self.tenant.api
        url = api.base_url.rstrip("/") + path
        query = {k: str(v) for k, v in params.items() if v is not None}
        # A stream's body has no deadline (the SSE idle timeout covers silence); its
        # connect and response headers are bounded below, as every request's are.
        timeout = aiohttp.ClientTimeout(
            total=None if stream else api.timeout,
            sock_connect=api.timeout,
            sock_read=None if stream else api.timeout,
        )
        attempt = 0
        reread = False
        while True:
            pause = self.pause_remaining()
            if pause > 0:
                await asyncio.sleep(pause)
            headers = self._auth_headers()  # signed afresh for every try
            err: UpstreamError
            try:
                async with asyncio.timeout(api.timeout):  # connect + response headers
                    resp = await self._session.get(
                        url,
                        params=query,
                        headers=headers,
                        timeout=timeout,
                        allow_redirects=False,  # signed headers go to Chert only
                    )
            except aiohttp.ClientError as e:  # aiohttp's own timeouts included
                err = ChertUnreachableError(f"GET {path}: {type(e).__name__}: {e}")
            except TimeoutError:
                err = ChertUnreachableError(f"GET {path}: no response within {api.timeout:g}s")
            else:
                if resp.status < 300:
                    self._count("ok")
                    return resp
                try:
                    body = await resp.read()
                except (aiohttp.ClientError, TimeoutError):
                    body = b""
                finally:
                    resp.release()
                err = parse_error(resp.status, resp.headers, body)
                if self._metrics is not None:
                    label = str(err.code) if err.code == 0 or 1000 <= err.code <= 9999 else "other"
                    self._metrics.chert_api_errors.labels(self.slug, label).inc()
                if err.retry_after is not None:
                    self._paused_until = max(self._paused_until, time.monotonic() + err.retry_after)
                if err.is_auth and not reread and self._reread_secret():
                    reread = True
                    continue
            self._count(_outcome(err))
            retryable = isinstance(err, ChertUnreachableError) or (
                isinstance(err, ChertApiError) and err.retryable
            )
            attempt += 1
            if not retryable or attempt >= api.max_attempts:
                self._log_error(path, err, attempt, None)
                raise err
            delay = None
            if isinstance(err, ChertApiError) and err.retry_after is not None:
                delay = err.retry_after  # slept at the top of the loop, as the pause
            else:
                delay = self._backoff(attempt)
                await asyncio.sleep(delay)
            self._log_error(path, err, attempt, delay)

    def _log_error(self, path: str, err: UpstreamError, attempt: int, delay: float | None) -> None:
        then = "giving up" if delay is None else f"retrying in {delay:.1f}s"
        if isinstance(err, ChertApiError):
            level = logging.DEBUG if err.is_auth else logging.WARNING
            log.log(
                level,
                "tenant %s: GET %s: Chert answered %d code %d (%s), retryable=%s, "
                "trace_id=%s; attempt %d, %s",
                self.slug,
                path,
                err.status,
                err.code,
                err.message,
                err.retryable,
                err.trace_id or "-",
                attempt,
                then,
            )
        else:
            log.warning("tenant %s: %s; attempt %d, %s", self.slug, err, attempt, then)

    # --- endpoints ---------------------------------------------------------------------

    async def events_page(
        self,
        *,
        since: str | None = None,
        cursor: str | None = None,
        limit: int | None = None,
        status: str | None = None,
        event_type: str | None = None,
    ) -> Page:
        """One page of ``GET /events``."""
        params: dict[str, str | int | None] = {
            "since": since,
            "cursor": cursor,
            "limit": limit,
            "status": status,
            "type": event_type,
        }
        resp = await self._request("/events", params)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ChertUnreachableError(f"GET /events: {type(e).__name__}: {e}") from None
        finally:
            resp.release()
        try:
            obj = json.loads(body)
            rows = obj["events"]
            cursor_out = obj.get("next_cursor")
            if isinstance(cursor_out, int) and not isinstance(cursor_out, bool):
                cursor_out = str(cursor_out)  # an opaque token: sent back as it came
            if not isinstance(rows, list) or not (
                cursor_out is None or isinstance(cursor_out, str)
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ChertApiError(
                resp.status,
                0,
                "GET /events: unexpected response shape",
                retryable=True,
                trace_id=resp.headers.get("X-Trace-ID"),
            ) from None
        return Page(
            rows=[r for r in rows if isinstance(r, dict)],
            next_cursor=cursor_out or None,
            trace_id=resp.headers.get("X-Trace-ID"),
        )

    async def events(self, *, since: str | None, page_size: int) -> AsyncIterator[Page]:
        """Every page of ``GET /events?since=…``, following ``next_cursor`` to its end.

        Returns only when Chert answers ``next_cursor: null``: the window is complete.
        Raises :class:`ChertPagingError` (after yielding the pages read) if the chain
        breaks — a server bug that must neither loop forever nor pass for the end.
        """
        page = await self.events_page(since=since, limit=page_size)
        yield page
        pages = 1
        seen_cursors: set[str] = set()
        while page.next_cursor is not None:
            if page.next_cursor in seen_cursors:
                raise ChertPagingError(
                    f"GET /events: Chert gave a cursor it had already given after {pages} "
                    f"page(s) (since={since or '-'}); the rest of the window was not read"
                )
            if pages >= MAX_PAGES_PER_WINDOW:
                raise ChertPagingError(
                    f"GET /events: still more pages after {pages} (since={since or '-'}); "
                    "the window was given up"
                )
            seen_cursors.add(page.next_cursor)
            page = await self.events_page(since=since, cursor=page.next_cursor, limit=page_size)
            pages += 1
            yield page

    @contextlib.asynccontextmanager
    async def stream(self, *, since: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open ``GET /events/stream`` response (SSE); released on exit."""
        resp = await self._request("/events/stream", {"since": since}, stream=True)
        try:
            yield resp
        finally:
            resp.close()
