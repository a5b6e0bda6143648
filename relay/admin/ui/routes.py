"""The operator page on the admin listener: ``/ui``.

- ``GET /ui`` — tenants, sinks and the queue (:mod:`.overview`), and the dead letters
  matching the filters in the query string (``tenant``, ``sink``, ``class``, ``type``,
  ``since``, ``until``, ``limit``), with replay and purge buttons for a ``replay`` token;
- ``GET /ui/deadletter?tenant=&sink=&event_id=`` — one dead letter with its event;
- ``GET /ui/events``, ``GET /ui/event`` and ``POST /ui/event/resend`` — the event log:
  search, one event's page with its attempts, resend (:mod:`.events`);
- ``POST /ui/deadletters/replay`` and ``/purge`` — one entry (``tenant``, ``sink``,
  ``event_id``) or every entry matching the filters: the first POST shows what would be
  done, and only a second one with ``confirm=yes`` does it (the dead-letter store's
  dry run and replay or purge, as ``/api/deadletters`` and ``chert-relay dlq`` do);
- ``POST /ui/sinks/pause``, ``/resume`` and ``/test`` — one sink (``tenant``, ``sink``):
  pause or resume it (back to the overview), or send it a test event and show its
  answer (:mod:`relay.admin.sinks`, as ``/api/sinks`` and ``chert-relay sinks`` do);
- ``GET``/``POST /ui/login``, ``POST /ui/logout``, ``GET /ui/style.css``.

Server-rendered, no script at all: every answer carries a Content-Security-Policy
that allows only this listener's style sheet and forms (``default-src 'none'``,
``frame-ancestors 'none'``), ``X-Content-Type-Options: nosniff`` and ``no-store``.
Who may see and do what is the admin token's (:mod:`relay.admin.auth`), logged in once
(:mod:`.sessions`: cookie, CSRF token, origin check).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from aiohttp import web
from multidict import MultiDictProxy

from relay.admin import sinks
from relay.admin.app import Admin
from relay.admin.auth import Principal
from relay.admin.ui import html, views
from relay.admin.ui.events import EventPages
from relay.admin.ui.overview import read_overview
from relay.admin.ui.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginNonces,
    Session,
    Sessions,
    clear_cookie,
    foreign_origin,
    same,
    set_cookie,
)
from relay.errors import DeadLetterError
from relay.runtime import Runtime
from relay.store.deadletters import CLASSES, DeadLetter, DeadLetterStore, Filter, parse_time
from relay.upstream.poller import Poller

log = logging.getLogger(__name__)

LOGIN_READ_S = 10.0  # a log-in form is a few hundred bytes, sent at once

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form POSTs send Origin: null
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
LATEST_TIME = 1e11  # unix seconds past any date a dead letter can have (year 5138)


@dataclass
class Ctx:
    """One request to a page behind the log-in: who, their session, the form if any."""

    request: web.Request
    who: Principal
    session: Session
    form: MultiDictProxy[str | bytes | Any] | None = None

    def value(self, name: str) -> str:
        source: Any = self.request.query if self.form is None else self.form
        v = source.get(name, "")
        return v.strip() if isinstance(v, str) else ""


Handler = Callable[[Ctx], Awaitable[web.Response]]


def respond(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


class OperatorPage:
    def __init__(self, admin: Admin, rt: Runtime, poller: Callable[[], Poller | None]) -> None:
        self._admin = admin
        self._rt = rt
        self._poller = poller
        self.sessions = Sessions()
        self.nonces = LoginNonces()
        self._store = DeadLetterStore(rt.redis, rt.config)
        self.events = EventPages(
            rt, admin.refusals, render=self._render, error=self._error, redirect=redirect
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/ui", self._page(self.overview)),
            web.get("/ui/deadletter", self._page(self.show)),
            web.post("/ui/deadletters/{action:replay|purge}", self._page(self.change, True)),
            web.post("/ui/sinks/{action:pause|resume|test}", self._page(self.sink_action, True)),
            web.get("/ui/events", self._page(self.events.search)),
            web.get("/ui/event", self._page(self.events.show)),
            web.post("/ui/event/resend", self._page(self.events.resend, True)),
            web.post("/ui/logout", self._page(self.logout, True)),
            web.get("/ui/login", self.login_form),
            web.post("/ui/login", self.login),
            web.get("/ui/style.css", self.style),
        ]

    # --- log-in ----------------------------------------------------------------------------

    def _page(self, handler: Handler, changes: bool = False) -> Callable[..., Any]:
        """``handler`` behind the log-in (and, for a POST, the CSRF checks)."""

        async def run(request: web.Request) -> web.Response:
            tokens = self._admin.tokens
            if not tokens.enabled:
                return respond(html.page("Off", views.error(OFF)), 403)
            session = self.sessions.get(request)
            who = None if session is None else tokens.by_digest(session.token_digest)
            if session is None or who is None:
                if request.method == "GET":
                    return redirect("/ui/login")
                self._admin.refusals.note(request, "unauthorized")
                return respond(html.page("Log in", views.error(EXPIRED)), 401)
            ctx = Ctx(request, who, session)
            if changes:
                ctx.form = await request.post()
                if foreign_origin(request) or not same(ctx.value("csrf"), session.csrf):
                    self._admin.refusals.note(request, "csrf", who=who.name)
                    return self._error(ctx, 403, CSRF)
            try:
                return await handler(ctx)
            except (redis.exceptions.RedisError, OSError) as e:
                log.warning("operator page: Redis unavailable: %s", e)
                return self._error(ctx, 503, f"Redis is unavailable ({type(e).__name__}).")

        return run

    async def login_form(self, request: web.Request) -> web.Response:
        if not self._admin.tokens.enabled:
            return respond(html.page("Off", views.error(OFF)), 403)
        return self._login_page(request)

    def _login_page(self, request: web.Request, message: str | None = None) -> web.Response:
        nonce = self.nonces.issue()
        resp = respond(html.page("Log in", views.login(nonce, message)), 401 if message else 200)
        set_cookie(resp, request, LOGIN_COOKIE, nonce)
        return resp

    async def login(self, request: web.Request) -> web.Response:
        if not self._admin.tokens.enabled:
            return respond(html.page("Off", views.error(OFF)), 403)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if foreign_origin(request) or not self.nonces.valid(expected):
            # before the form is read: only a browser shown the form may send one
            self._admin.refusals.note(request, "csrf")
            return self._login_page(request, "The log-in form expired: try again.")
        try:
            async with asyncio.timeout(LOGIN_READ_S):  # no one is known yet: no trickling
                form = await request.post()
        except TimeoutError:
            self._admin.refusals.note(request, "head_timeout")
            raise web.HTTPRequestTimeout() from None
        nonce, token = form.get("nonce"), form.get("token")
        if not isinstance(nonce, str) or not same(nonce, expected):
            self._admin.refusals.note(request, "csrf")
            return self._login_page(request, "The log-in form expired: try again.")
        who = None
        if isinstance(token, str) and token.strip():
            who = self._admin.tokens.find(token.strip().encode(errors="surrogateescape"))
        if who is None:
            self._admin.refusals.note(request, "login_failed")
            return self._login_page(request, "That is not a valid admin token.")
        session_id, _ = self.sessions.create(who.digest)
        log.info("operator page: token %s logged in from %s", who.name, request.remote)
        resp = redirect("/ui")
        set_cookie(resp, request, SESSION_COOKIE, session_id)
        clear_cookie(resp, LOGIN_COOKIE)
        return resp

    async def logout(self, ctx: Ctx) -> web.Response:
        self.sessions.drop(ctx.request)
        resp = redirect("/ui/login")
        clear_cookie(resp, SESSION_COOKIE)
        return resp

    async def style(self, request: web.Request) -> web.Response:
        headers = {**SECURITY_HEADERS, "Cache-Control": "private, max-age=300"}
        return web.Response(text=html.CSS, content_type="text/css", headers=headers)

    # --- pages -----------------------------------------------------------------------------

    def _store_now(self) -> DeadLetterStore:
        self._store.set_config(self._rt.config)
        return self._store

    def _render(self, ctx: Ctx, title: str, body: html.Markup, status: int = 200) -> web.Response:
        return respond(html.page(title, body, who=ctx.who.name, csrf=ctx.session.csrf), status)

    def _error(self, ctx: Ctx, status: int, message: str) -> web.Response:
        body = html.join([views.error(message), html.Markup('<p><a href="/ui">Back</a></p>')])
        return self._render(ctx, "Refused" if status < 500 else "Unavailable", body, status)

    def _visible(self, who: Principal) -> list[str]:
        return who.visible(t.slug for t in self._rt.config.tenants)

    async def overview(self, ctx: Ctx) -> web.Response:
        q = _query(ctx)
        visible = self._visible(ctx.who)
        state = await read_overview(self._rt.redis, self._rt.config, self._poller(), visible)
        if ctx.who.tenants is not None:
            state.queue = None  # the queue is every tenant's: not for a scoped token
        can_change = ctx.who.can("replay")
        parts = [
            views.overview(state, csrf=ctx.session.csrf, can_change=can_change),
            views.filters(q, visible),
        ]
        status = 200
        try:
            flt = self._filter(ctx, q, with_limit=True)
            limit = flt.limit or DEFAULT_LIMIT
            found = await self._store_now().find(dataclasses.replace(flt, limit=limit + 1))
        except (ValueError, DeadLetterError) as e:
            parts.append(views.error(str(e)))
            status = 403 if isinstance(e, Forbidden) else 400
        else:
            parts.append(
                views.dead_letters(
                    found[:limit],
                    q,
                    more=len(found) > limit,
                    csrf=ctx.session.csrf,
                    can_change=ctx.who.can("replay"),
                    now=state.now,
                )
            )
        return self._render(ctx, "Overview", html.join(parts), status)

    def _filter(self, ctx: Ctx, q: views.Query, *, with_limit: bool) -> Filter:
        """The store's filter from the form, bounded to the viewer's tenants."""
        if q.tenant and not ctx.who.sees(q.tenant):
            self._admin.refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
            raise Forbidden(f"this token may not see tenant {q.tenant!r}")
        if q.cls and q.cls not in CLASSES:
            raise ValueError(f"unknown class {q.cls!r} (one of {', '.join(CLASSES)})")
        limit = None
        if with_limit and q.limit:
            limit = int(q.limit) if q.limit.isdigit() else 0
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError(f"limit must be a number from 1 to {MAX_LIMIT}")
        return Filter(
            tenant=q.tenant or None,
            sink=q.sink or None,
            cls=q.cls or None,
            event_type=q.type or None,
            since=_time("since", q.since),
            until=_time("until", q.until),
            limit=limit,
            within=ctx.who.tenants,
        )

    async def show(self, ctx: Ctx) -> web.Response:
        tenant, sink, event_id = ctx.value("tenant"), ctx.value("sink"), ctx.value("event_id")
        if not ctx.who.sees(tenant):
            self._admin.refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
            return self._error(ctx, 403, f"This token may not see tenant {tenant!r}.")
        store = self._store_now()
        d = await store.get(tenant, sink, event_id)
        if d is None:
            return self._error(ctx, 404, "No such dead letter (replayed or purged meanwhile?).")
        event = await store.payload(d.tenant, d.event_id)
        body = views.detail(
            d,
            event,
            csrf=ctx.session.csrf,
            can_change=ctx.who.can("replay"),
            now=time.time(),
        )
        return self._render(ctx, "Dead letter", body)

    async def change(self, ctx: Ctx) -> web.Response:
        action = ctx.request.match_info["action"]
        if not ctx.who.can("replay"):
            self._admin.refusals.note(ctx.request, "forbidden_scope", who=ctx.who.name)
            return self._error(
                ctx, 403, f"This token's scope is {ctx.who.scope!r}: it cannot {action}."
            )
        try:
            found, values = await self._targets(ctx)
        except Forbidden as e:
            return self._error(ctx, 403, str(e))
        except (ValueError, DeadLetterError) as e:
            return self._error(ctx, 400, str(e))
        store = self._store_now()
        if ctx.value("confirm") != "yes":
            body = views.confirm(action, found, values, ctx.session.csrf, time.time())
            return self._render(ctx, f"Confirm {action}", body)
        if action == "replay":
            out = await store.replay_entries(found)
        else:
            out = await store.purge_entries(found)
        log.info(
            "operator page: token %s: %s of %d dead letter(s), %d skipped",
            ctx.who.name,
            action,
            len(out.done),
            len(out.skipped),
        )
        return self._render(ctx, f"{action.capitalize()} done", views.result(action, out))

    async def sink_action(self, ctx: Ctx) -> web.Response:
        """Pause, resume or test one sink (``tenant``, ``sink``): as the sink API does."""
        action = ctx.request.match_info["action"]
        tenant, sink = ctx.value("tenant"), ctx.value("sink")
        if not ctx.who.can("replay"):
            self._admin.refusals.note(ctx.request, "forbidden_scope", who=ctx.who.name)
            return self._error(
                ctx, 403, f"This token's scope is {ctx.who.scope!r}: it cannot {action} a sink."
            )
        if not ctx.who.sees(tenant):
            self._admin.refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
            return self._error(ctx, 403, f"This token may not see tenant {tenant!r}.")
        config = self._rt.config
        by = f"operator page (token {ctx.who.name})"
        try:
            if action == "test":
                answer = await sinks.send_test_event(config, tenant, sink, by)
                return self._render(ctx, "Test event", views.sink_test(answer))
            if action == "pause":
                await sinks.pause(self._rt.redis, config, tenant, sink, by)
            else:
                await sinks.resume(self._rt.redis, config, tenant, sink, by)
        except sinks.UnknownSink as e:
            return self._error(ctx, 404, str(e))
        return redirect("/ui")

    async def _targets(self, ctx: Ctx) -> tuple[list[DeadLetter], dict[str, str]]:
        """The entries a replay or purge form names (one, or a filter's), and the form
        fields that name them again on the confirmation."""
        event_id = ctx.value("event_id")
        if event_id:
            tenant, sink = ctx.value("tenant"), ctx.value("sink")
            if not ctx.who.sees(tenant):
                self._admin.refusals.note(ctx.request, "forbidden_tenant", who=ctx.who.name)
                raise Forbidden(f"this token may not see tenant {tenant!r}")
            d = await self._store_now().get(tenant, sink, event_id)
            return ([] if d is None else [d]), {
                "tenant": tenant,
                "sink": sink,
                "event_id": event_id,
            }
        q = _query(ctx)
        found = await self._store_now().find(self._filter(ctx, q, with_limit=False))
        return found, q.fields()


class Forbidden(ValueError):
    """A filter names a tenant the token may not see."""


OFF = "The operator page is off: set admin.token or [[admin.tokens]] in the configuration."
EXPIRED = "Your session has ended: log in again."
CSRF = "This form did not come from this page (or it expired): reload the page and try again."


def _query(ctx: Ctx) -> views.Query:
    return views.Query(
        tenant=ctx.value("tenant"),
        sink=ctx.value("sink"),
        cls=ctx.value("class"),
        type=ctx.value("type"),
        since=ctx.value("since"),
        until=ctx.value("until"),
        limit=ctx.value("limit"),
    )


def _time(name: str, text: str) -> float | None:
    if not text:
        return None
    t = parse_time(text)
    if not 0 <= t <= LATEST_TIME:
        raise ValueError(f"{name} {text!r} is out of range")
    return t
