"""The event log on the operator page (:mod:`relay.store.eventlog`, views in
:mod:`.event_views`):

- ``GET /ui/events`` — the search: ``event_id`` (exact, in every tenant the session
  sees, or ``tenant``), or ``tenant``, ``sink``, ``type``, ``chat``, ``state``,
  ``since``, ``until`` and ``q`` (text in the payload), newest first, :data:`PAGE_SIZE`
  at a time with an "older" link carrying the search's ``cursor``;
- ``GET /ui/event?tenant=&event_id=`` — one event: its fields, arrivals, payload, and
  per sink its state and every attempt (the id is a query value, as for a dead letter,
  so any id the relay took in has a page);
- ``POST /ui/event/resend`` (``tenant``, ``event_id``, ``sink`` or none: every sink it
  was routed to) — a ``replay`` session's resend, as ``/api/events/…/resend`` does;
  answered with a redirect to the event's page, which says what was resent
  (``resent=SINK:VERDICT``; only this record's sinks and known verdicts are shown).

Who sees and does what is the session's token's, as for dead letters: ``read`` sees,
``replay`` resends, and a token scoped to some tenants is refused (``403``) any other
tenant — before anything is looked up, so nothing says whether an event exists there.
Query parameters these pages do not know are ignored, as on the rest of the page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from aiohttp import web

from relay.admin.auth import Principal, Refusals
from relay.admin.ui import event_views, views
from relay.admin.ui.event_views import Search
from relay.admin.ui.html import Markup, join
from relay.errors import EventLogError
from relay.runtime import Runtime
from relay.store.deadletters import parse_time
from relay.store.eventlog import RESEND_SKIPPED, STATES, EventLog, Query

if TYPE_CHECKING:
    from relay.admin.ui.routes import Ctx

log = logging.getLogger(__name__)

PAGE_SIZE = 50
LATEST_TIME = 1e11  # unix seconds past any date a record can have (year 5138)

Render = Callable[["Ctx", str, Markup, int], web.Response]
Refuse = Callable[["Ctx", int, str], web.Response]


class Forbidden(ValueError):
    """The search names a tenant the token may not see."""


class EventPages:
    def __init__(
        self,
        rt: Runtime,
        refusals: Refusals,
        *,
        render: Render,
        error: Refuse,
        redirect: Callable[[str], web.Response],
    ) -> None:
        self._rt = rt
        self._refusals = refusals
        self._render = render
        self._error = error
        self._redirect = redirect
        self._log = EventLog(rt.redis, rt.config)

    def _log_now(self) -> EventLog:
        self._log.set_config(self._rt.config)
        return self._log

    def _visible(self, who: Principal) -> list[str]:
        return who.visible(t.slug for t in self._rt.config.tenants)

    def _refuse_tenant(self, ctx: Ctx, tenant: str) -> web.Response:
        self._refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
        return self._error(ctx, 403, f"This token may not see tenant {tenant!r}.")

    async def search(self, ctx: Ctx) -> web.Response:
        s = Search(**{name: ctx.value(name) for name in Search().fields()})
        visible = self._visible(ctx.who)
        parts = [event_views.search_form(s, visible)]
        status = 200
        now = time.time()
        try:
            tenants = self._tenants(ctx, s.tenant, visible)
            if s.event_id:
                found = await self._log_now().find(s.event_id, tenants)
                parts.append(event_views.found_by_id(found, s.event_id, len(tenants), now))
            else:
                cursor = ctx.value("cursor") or None
                page = await self._log_now().search(_query(s, tenants, cursor))
                parts.append(event_views.results(page, s, now, continued=cursor is not None))
        except Forbidden as e:
            parts.append(views.error(str(e)))
            status = 403
        except (ValueError, EventLogError) as e:
            parts.append(views.error(str(e)))
            status = 400
        return self._render(ctx, "Events", join(parts), status)

    def _tenants(self, ctx: Ctx, tenant: str, visible: list[str]) -> list[str]:
        if not tenant:
            return visible
        if not ctx.who.sees(tenant):
            self._refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
            raise Forbidden(f"this token may not see tenant {tenant!r}")
        if tenant not in visible:
            raise EventLogError(f"unknown tenant {tenant!r}")
        return [tenant]

    async def show(self, ctx: Ctx) -> web.Response:
        tenant, event_id = _raw(ctx, "tenant"), _raw(ctx, "event_id")
        if not ctx.who.sees(tenant):
            return self._refuse_tenant(ctx, tenant)
        rec = await self._log_now().get(tenant, event_id)
        if rec is None:
            return self._error(
                ctx,
                404,
                "No record of this event (never taken in, or past the event log's retention).",
            )
        sinks = {s.sink for s in rec.sinks}
        resent = []
        for item in ctx.request.query.getall("resent", []):
            sink, _, verdict = item.partition(":")
            if sink in sinks and (verdict == "ok" or verdict in RESEND_SKIPPED):
                resent.append((sink, verdict))
        body = event_views.event_page(
            rec,
            csrf=ctx.session.csrf,
            can_resend=ctx.who.can("replay"),
            now=time.time(),
            resent=resent,
        )
        return self._render(ctx, "Event", body, 200)

    async def resend(self, ctx: Ctx) -> web.Response:
        tenant, event_id, sink = _raw(ctx, "tenant"), _raw(ctx, "event_id"), _raw(ctx, "sink")
        if not ctx.who.can("replay"):
            self._refusals.note(ctx.request, "forbidden_scope", who=ctx.who.name)
            return self._error(
                ctx, 403, f"This token's scope is {ctx.who.scope!r}: it cannot resend."
            )
        if not ctx.who.sees(tenant):
            return self._refuse_tenant(ctx, tenant)
        try:
            done = await self._log_now().resend(tenant, event_id, sink or None)
        except EventLogError as e:
            return self._error(ctx, 404 if "no record" in str(e) else 400, f"{e}.")
        log.info(
            "operator page: token %s: resend of an event to %d sink(s), %d resent",
            ctx.who.name,
            len(done),
            sum(1 for _, v in done if v == "ok"),
        )
        query = [("tenant", tenant), ("event_id", event_id)]
        query += [("resent", f"{s}:{v}") for s, v in done]
        return self._redirect(f"/ui/event?{urlencode(query)}")


def _raw(ctx: Ctx, name: str) -> str:
    """A value as the page's own link or form gave it (an event id is exact: not trimmed)."""
    source = ctx.request.query if ctx.form is None else ctx.form
    value = source.get(name, "")
    return value if isinstance(value, str) else ""


def _query(s: Search, tenants: list[str], cursor: str | None) -> Query:
    if s.state and s.state not in STATES:
        raise ValueError(f"unknown state {s.state!r} (one of {', '.join(STATES)})")
    return Query(
        tenants=tenants,
        sink=s.sink or None,
        type=s.type or None,
        chat=s.chat or None,
        state=s.state or None,
        since=_time("since", s.since),
        until=_time("until", s.until),
        text=s.q or None,
        limit=PAGE_SIZE,
        cursor=cursor,
    )


def _time(name: str, text: str) -> float | None:
    if not text:
        return None
    t = parse_time(text)
    if not 0 <= t <= LATEST_TIME:
        raise ValueError(f"{name} {text!r} is out of range")
    return t
