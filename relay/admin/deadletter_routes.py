"""Dead letters over the admin API (``/api/…``, behind the admin bearer token).

- ``GET /api/deadletters?tenant=&sink=&class=&type=&since=&until=&limit=`` — list
  (``since``/``until``: unix seconds, ISO 8601 or an age such as ``2h``)
- ``GET /api/deadletters/{tenant}/{sink}/{event_id}`` — one entry with its event
- ``POST /api/deadletters/replay`` and ``POST /api/deadletters/purge`` — a JSON body
  with the same filters, plus ``"all": true`` (needed when no filter is given) and
  ``"dry_run": true``

A parameter or body key none of these know is ``400``, as a bad value is.

What a request may do is its admin token's (:mod:`relay.admin.auth`): a token scoped
to some tenants sees only theirs (a filter without ``tenant`` covers only them, and
naming another, or showing one of its entries, is ``403``); replay and purge need scope
``replay``.

Register with ``admin.add_api_routes(DeadLetterApi(redis, lambda: config, refusals).routes())``
before the admin app is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from relay.admin.auth import Principal, Refusals, principal
from relay.config import Config
from relay.errors import DeadLetterError
from relay.store.deadletters import DeadLetterStore, Filter, parse_time

log = logging.getLogger(__name__)

MAX_LIMIT = 10_000
FILTERS = ("tenant", "sink", "class", "type", "since", "until")
# What each route takes: anything else is refused, not ignored — a filter the relay
# does not know (``?event_id=…``) would otherwise widen a list, or a replay or purge, to
# every dead letter.
LIST_KEYS = (*FILTERS, "limit")
CHANGE_KEYS = (*FILTERS, "all", "dry_run")


def _bad(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "message": message}, status=400)


def _refuse_unknown(src: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in src if k not in known)
    if unknown:
        hint = ""
        if "event_id" in unknown:
            hint = "; one dead letter is GET /api/deadletters/{tenant}/{sink}/{event_id}"
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known)}){hint}"
        )


def _filter(src: dict[str, Any], *, with_limit: bool) -> Filter:
    _refuse_unknown(src, LIST_KEYS if with_limit else CHANGE_KEYS)

    def text(name: str) -> str | None:
        v = src.get(name)
        if v is None or v == "":
            return None
        if not isinstance(v, str | int | float):
            raise ValueError(f"{name} must be a string")
        return str(v)

    limit: int | None = None
    if with_limit:
        raw = text("limit")
        limit = 1000 if raw is None else int(raw)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    since, until = text("since"), text("until")
    return Filter(
        tenant=text("tenant"),
        sink=text("sink"),
        cls=text("class"),
        event_type=text("type"),
        since=None if since is None else parse_time(since),
        until=None if until is None else parse_time(until),
        limit=limit,
    )


def within(flt: Filter, who: Principal) -> Filter:
    """``flt`` bounded to the tenants ``who`` may see."""
    return flt if who.tenants is None else dataclasses.replace(flt, within=who.tenants)


class DeadLetterApi:
    def __init__(
        self,
        redis_client: Redis,
        config: Callable[[], Config],
        refusals: Refusals | None = None,
    ) -> None:
        self._config = config
        self._store = DeadLetterStore(redis_client, config())
        self._refusals = refusals or Refusals(lambda reason: None)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/deadletters", self.list),
            web.get("/api/deadletters/{tenant}/{sink}/{event_id}", self.show),
            web.post("/api/deadletters/replay", self.replay),
            web.post("/api/deadletters/purge", self.purge),
        ]

    def _store_now(self) -> DeadLetterStore:
        self._store.set_config(self._config())
        return self._store

    async def list(self, request: web.Request) -> web.Response:
        who = principal(request)
        try:
            flt = _filter(dict(request.query), with_limit=True)
            if flt.tenant is not None and not who.sees(flt.tenant):
                return self._refusals.forbidden_tenant(request, who, flt.tenant)
            found = await self._store_now().find(within(flt, who))
        except (ValueError, DeadLetterError) as e:
            return _bad(str(e))
        return web.json_response({"count": len(found), "entries": [d.to_json() for d in found]})

    async def show(self, request: web.Request) -> web.Response:
        m = request.match_info
        who = principal(request)
        if not who.sees(m["tenant"]):
            return self._refusals.forbidden_tenant(request, who, m["tenant"])
        store = self._store_now()
        d = await store.get(m["tenant"], m["sink"], m["event_id"])
        if d is None:
            return web.json_response(
                {"error": "not_found", "message": "no such dead letter"}, status=404
            )
        body = await store.payload(d.tenant, d.event_id)
        out = d.to_json()
        out["event"] = None if body is None else json.loads(body)
        return web.json_response(out)

    async def replay(self, request: web.Request) -> web.Response:
        return await self._change(request, "replay")

    async def purge(self, request: web.Request) -> web.Response:
        return await self._change(request, "purge")

    async def _change(self, request: web.Request, action: str) -> web.Response:
        who = principal(request)
        if not who.can("replay"):
            return self._refusals.forbidden_scope(request, who, "replay")
        try:
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            flt = _filter(body, with_limit=False)
            everything = body.get("all") is True
            dry_run = body.get("dry_run") is True
            if flt.is_empty() and not everything:
                raise ValueError(
                    'give a filter (tenant, sink, class, type, since, until) or "all": true'
                )
            if flt.tenant is not None and not who.sees(flt.tenant):
                return self._refusals.forbidden_tenant(request, who, flt.tenant)
            flt = within(flt, who)
            store = self._store_now()
            if action == "replay":
                out = await store.replay(flt, dry_run=dry_run)
            else:
                out = await store.purge(flt, dry_run=dry_run)
        except (ValueError, DeadLetterError) as e:  # json.JSONDecodeError is a ValueError
            return _bad(str(e))
        except RecursionError:
            return _bad("the body is nested too deeply")
        log.info(
            "admin API: token %s: %s%s of %d dead letter(s), %d skipped",
            who.name,
            action,
            " (dry run)" if dry_run else "",
            len(out.done),
            len(out.skipped),
        )
        return web.json_response({"action": action, "dry_run": dry_run, **out.to_json()})
