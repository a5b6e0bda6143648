"""The event log over the admin API (``/api/…``, behind the admin bearer token).

- ``GET /api/events?tenant=&sink=&type=&chat=&state=&since=&until=&q=&field=&limit=&scan=&cursor=``
  — newest first (``q``: text in the payload; ``field``: ``PATH=VALUE`` in it; ``scan``:
  at most this many records read); the answer says how many records were read and
  gives the next page's ``cursor`` (null: nothing older). ``?event_id=…`` finds one
  event by id alone, in every tenant the token sees (or ``tenant``).
- ``GET /api/events/{tenant}/{event_id}`` — one record, with its payload.
- ``POST /api/events/{tenant}/{event_id}/resend`` — deliver it again; a JSON body may
  name one ``sink`` (default: every sink it was routed to).

A parameter or body key none of these know is ``400``. A ``read`` token sees, a
``replay`` token may resend, and a token scoped to some tenants sees and touches only
theirs (naming another is ``403``) — as for dead letters (:mod:`relay.admin.auth`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from relay.admin.auth import Refusals, principal
from relay.config import Config
from relay.errors import EventLogError
from relay.store.deadletters import parse_time
from relay.store.eventlog import RESEND_SKIPPED, SCAN_MAX, EventLog, Query

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
LIST_KEYS = (
    "event_id", "tenant", "sink", "type", "chat", "state", "since", "until", "q", "field",
    "limit", "scan", "cursor",
)  # fmt: skip
RESEND_KEYS = ("sink",)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "message": message}, status=400)


def _not_found(message: str) -> web.Response:
    return web.json_response({"error": "not_found", "message": message}, status=404)


def _refuse_unknown(src: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in src if k not in known)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
        )


def _number(src: dict[str, str], name: str, default: int, top: int) -> int:
    raw = src.get(name) or str(default)
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
    if not 1 <= n <= top:
        raise ValueError(f"{name} must be between 1 and {top}")
    return n


class EventLogApi:
    def __init__(
        self,
        redis_client: Redis,
        config: Callable[[], Config],
        refusals: Refusals | None = None,
    ) -> None:
        self._config = config
        self._log = EventLog(redis_client, config())
        self._refusals = refusals or Refusals(lambda reason: None)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/events", self.list),
            web.get("/api/events/{tenant}/{event_id}", self.show),
            web.post("/api/events/{tenant}/{event_id}/resend", self.resend),
        ]

    def _now(self) -> EventLog:
        self._log.set_config(self._config())
        return self._log

    async def list(self, request: web.Request) -> web.Response:
        who = principal(request)
        src = dict(request.query)
        try:
            _refuse_unknown(src, LIST_KEYS)
            tenant = src.get("tenant") or None
            if tenant is not None and not who.sees(tenant):
                return self._refusals.forbidden_tenant(request, who, tenant)
            slugs = [t.slug for t in self._config().tenants]
            if tenant is not None and tenant not in slugs:
                raise EventLogError(f"unknown tenant {tenant!r}")
            tenants = who.visible([tenant] if tenant else slugs)
            event_log = self._now()
            if src.get("event_id"):
                found = await event_log.find(src["event_id"], tenants)
                return web.json_response(
                    {"events": [r.to_json() for r in found], "scanned": len(tenants)}
                )
            path = value = None
            if src.get("field"):
                path, eq, value = src["field"].partition("=")
                if not eq or not path:
                    raise ValueError("field takes PATH=VALUE, e.g. data.chat.id=17f6e9ed")
            since, until = src.get("since"), src.get("until")
            page = await event_log.search(
                Query(
                    tenants=tenants,
                    sink=src.get("sink") or None,
                    type=src.get("type") or None,
                    chat=src.get("chat") or None,
                    state=src.get("state") or None,
                    since=parse_time(since) if since else None,
                    until=parse_time(until) if until else None,
                    text=src.get("q") or None,
                    field_path=path,
                    field_value=value,
                    limit=_number(src, "limit", 50, MAX_LIMIT),
                    scan=_number(src, "scan", 10_000, SCAN_MAX),
                    cursor=src.get("cursor") or None,
                )
            )
        except (ValueError, EventLogError) as e:
            return _bad(str(e))
        return web.json_response(
            {
                "events": [r.to_json() for r in page.records],
                "scanned": page.scanned,
                "scan_limit_reached": page.exhausted_scan,
                "cursor": page.cursor,
            }
        )

    async def show(self, request: web.Request) -> web.Response:
        m = request.match_info
        who = principal(request)
        if not who.sees(m["tenant"]):
            return self._refusals.forbidden_tenant(request, who, m["tenant"])
        if request.query:
            return _bad(f"unknown parameter(s) {', '.join(map(repr, sorted(request.query)))}")
        rec = await self._now().get(m["tenant"], m["event_id"])
        if rec is None:
            return _not_found("no record of this event (never taken in, or past retention)")
        return web.json_response(rec.to_json(payload=True))

    async def resend(self, request: web.Request) -> web.Response:
        m = request.match_info
        who = principal(request)
        if not who.can("replay"):
            return self._refusals.forbidden_scope(request, who, "replay")
        if not who.sees(m["tenant"]):
            return self._refusals.forbidden_tenant(request, who, m["tenant"])
        try:
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            _refuse_unknown(body, RESEND_KEYS)
            sink = body.get("sink")
            if sink is not None and not isinstance(sink, str):
                raise ValueError("sink must be a string")
            done = await self._now().resend(m["tenant"], m["event_id"], sink)
        except EventLogError as e:
            if "no record" in str(e):
                return _not_found(str(e))
            return _bad(str(e))
        except ValueError as e:
            return _bad(str(e))
        except RecursionError:
            return _bad("the body is nested too deeply")
        log.info(
            "admin API: token %s: resend of an event to %d sink(s), %d resent",
            who.name,
            len(done),
            sum(1 for _, v in done if v == "ok"),
        )
        return web.json_response(
            {
                "results": [
                    {"sink": s, "resent": v == "ok", "reason": RESEND_SKIPPED.get(v)}
                    for s, v in done
                ]
            }
        )
