"""Poller status over the admin API: ``GET /api/pollers`` (behind the admin bearer token).

One entry per tenant whose ``poll.mode`` is not ``off``. What lives in Redis is the
same for every relay process on it: the watermark, the last webhook, whether some
process holds the tenant's poll lease. Only the tenants the request's admin token may see
are listed. What a tenant poller is doing right now (its
mode, its last window and last failure) is known only to the process running it:
``polled_here`` says whether this one does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.admin.auth import principal
from relay.runtime import Runtime
from relay.store.script_pipe import REDIS_TRANSIENT
from relay.upstream.poller import Poller


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _age(ts: float | None, now: float) -> float | None:
    return None if ts is None else round(max(0.0, now - ts), 3)


class PollerStatusApi:
    """``routes()`` for :meth:`relay.admin.app.Admin.add_api_routes`; ``poller()`` returns
    this process's poller role, if it runs one (looked up per request)."""

    def __init__(self, rt: Runtime, poller: Callable[[], Poller | None]) -> None:
        self._rt = rt
        self._poller = poller

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/api/pollers", self.status)]

    async def status(self, request: web.Request) -> web.Response:
        rt = self._rt
        who = principal(request)  # a token scoped to some tenants sees only theirs
        tenants = [t for t in rt.config.tenants if t.poll.mode != "off" and who.sees(t.slug)]
        try:
            async with rt.redis.pipeline(transaction=False) as pipe:
                for t in tenants:
                    pipe.get(rt.keys.watermark(t.slug))
                    pipe.get(rt.keys.last_webhook(t.slug))
                    pipe.exists(rt.keys.poll_lease(t.slug))
                stored: list[Any] = await pipe.execute()
        except REDIS_TRANSIENT as e:
            return web.json_response(
                {"error": "redis_unavailable", "message": f"Redis unavailable: {type(e).__name__}"},
                status=503,
            )
        poller = self._poller()
        now = time.time()
        out = []
        for i, t in enumerate(tenants):
            raw_wm, raw_wh, leased = stored[3 * i : 3 * i + 3]
            watermark = float(raw_wm) if raw_wm is not None else None
            last_webhook = int(raw_wh) / 1000 if raw_wh is not None else None
            entry: dict[str, Any] = {
                "tenant": t.slug,
                "configured_mode": t.poll.mode,
                "watermark": _iso(watermark),
                "watermark_age_seconds": _age(watermark, now),
                "last_webhook": _iso(last_webhook),
                "last_webhook_age_seconds": _age(last_webhook, now),
                "lease_held": bool(leased),
            }
            tp = poller.tenants.get(t.slug) if poller is not None else None
            entry["polled_here"] = tp is not None and tp.lease.held
            if tp is not None:
                entry.update(
                    mode=tp.mode,
                    windows=tp.windows,
                    last_window=_iso(tp.last_window_at),
                    last_outcome=tp.last_outcome,
                    last_error=tp.last_error,
                    last_error_at=_iso(tp.last_error_at),
                )
            out.append(entry)
        return web.json_response({"tenants": out})
