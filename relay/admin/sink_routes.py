"""Sinks over the admin API (``/api/…``, behind the admin bearer token):

- ``GET /api/sinks?tenant=`` — every configured sink (of ``tenant`` if given) with its
  state: paused and since when, gone, breaker, waiting and in-flight deliveries
- ``POST /api/sinks/{tenant}/{sink}/pause`` and ``…/resume`` — idempotent; the answer
  says whether anything changed
- ``POST /api/sinks/{tenant}/{sink}/test`` — sign and POST a test event to the sink now
  (paused or not) and answer with what it said: status, milliseconds, an excerpt

The POST routes take no parameters: an empty body or ``{}``. A query parameter or body
key none of these know is ``400``. A ``read`` token may list, the POST routes need scope
``replay``, and a token scoped to some tenants sees and touches only theirs (``403``
otherwise), as for the dead letters (:mod:`relay.admin.deadletter_routes`). An unknown
tenant or sink is ``404``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from redis.asyncio import Redis

from relay.admin import sinks
from relay.admin.auth import Refusals, principal
from relay.config import Config

LIST_KEYS = ("tenant",)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "message": message}, status=400)


def _not_found(message: str) -> web.Response:
    return web.json_response({"error": "not_found", "message": message}, status=404)


def _unknown(names: list[str], known: tuple[str, ...]) -> str | None:
    unknown = sorted(k for k in names if k not in known)
    if not unknown:
        return None
    takes = f"known: {', '.join(known)}" if known else "this route takes none"
    return f"unknown parameter(s) {', '.join(map(repr, unknown))} ({takes})"


class SinkApi:
    def __init__(
        self, redis_client: Redis, config: Callable[[], Config], refusals: Refusals | None = None
    ) -> None:
        self._redis = redis_client
        self._config = config
        self._refusals = refusals or Refusals(lambda reason: None)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/sinks", self.list),
            web.post("/api/sinks/{tenant}/{sink}/{action:pause|resume|test}", self.act),
        ]

    async def list(self, request: web.Request) -> web.Response:
        who = principal(request)
        problem = _unknown(list(request.query), LIST_KEYS)
        if problem:
            return _bad(problem)
        config = self._config()
        tenant = request.query.get("tenant") or None
        if tenant is not None:
            if not who.sees(tenant):
                return self._refusals.forbidden_tenant(request, who, tenant)
            if config.tenant(tenant) is None:
                return _not_found(f"no tenant {tenant!r} in the configuration")
        tenants = who.visible(t.slug for t in config.tenants if tenant in (None, t.slug))
        found = await sinks.sink_states(self._redis, config, sinks.configured(config, tenants))
        return web.json_response({"count": len(found), "sinks": [s.to_json() for s in found]})

    async def act(self, request: web.Request) -> web.Response:
        m = request.match_info
        tenant, sink, action = m["tenant"], m["sink"], m["action"]
        who = principal(request)
        if not who.can("replay"):
            return self._refusals.forbidden_scope(request, who, "replay")
        problem = _unknown(list(request.query), ())
        if problem is None:
            problem = await _body_problem(request)
        if problem:
            return _bad(problem)
        if not who.sees(tenant):
            return self._refusals.forbidden_tenant(request, who, tenant)
        config = self._config()
        try:
            sinks.find_sink(config, tenant, sink)
        except sinks.UnknownSink as e:
            return _not_found(str(e))
        by = f"admin token {who.name}"
        if action == "test":
            answer = await sinks.send_test_event(config, tenant, sink, by)
            return web.json_response(answer.to_json())
        if action == "pause":
            out = await sinks.pause(self._redis, config, tenant, sink, by)
        else:
            out = await sinks.resume(self._redis, config, tenant, sink, by)
        return web.json_response(sinks.change_json(tenant, sink, action, out))


async def _body_problem(request: web.Request) -> str | None:
    """What is wrong with a POST's body, which may only be empty or ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return "the body must be empty or a JSON object"
    if not isinstance(body, dict):
        return "the body must be empty or a JSON object"
    return _unknown(list(body), ())
