"""The operator page's event-log views (:mod:`.events`): the search form and its results,
and one event's page — its fields, arrivals, payload, and per sink its state and every
attempt, with resend buttons. Escaped HTML throughout (:mod:`.html`): event ids, types,
chat ids, payloads, errors and answer excerpts all come from outside."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from relay.admin.ui.html import Markup, age, fmt, hidden, join, url, when
from relay.delivery.sink_client import described
from relay.store.eventlog import RESEND_SKIPPED, STATES, Attempt, EventRecord, Page, SinkState

# A queued delivery's live states (EventLog.get): a resend leaves it alone.
UNDER_WAY = frozenset(
    {"pending", "due", "scheduled", "in_flight", "waiting", "waiting_on_chat", "paused"}
)
STATE_CLASS = {
    "delivered": "ok",
    "dead_letter": "bad",
    "dropped": "bad",
    "expired": "bad",
    "not_routed": "muted",
}


@dataclass(frozen=True)
class Search:
    """The search form as it was filled in (shown again as given)."""

    event_id: str = ""
    tenant: str = ""
    sink: str = ""
    type: str = ""
    chat: str = ""
    state: str = ""
    since: str = ""
    until: str = ""
    q: str = ""  # text in the payload

    def fields(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stamp(ms: int | None) -> str:
    """``2026-05-24 01:35:34.120Z``: attempts are told apart by milliseconds."""
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def event_url(tenant: str, event_id: str) -> str:
    return url("/ui/event", tenant=tenant, event_id=event_id)


def badge(state: str, label: str | None = None) -> Markup:
    return fmt(
        '<span class="badge {}">{}</span>',
        STATE_CLASS.get(state, "warn"),
        (label or state).replace("_", " "),
    )


def search_form(s: Search, tenants: list[str]) -> Markup:
    def select(name: str, value: str, options: Iterable[str], blank: str) -> Markup:
        opts = [fmt('<option value="">{}</option>', blank)]
        opts += [
            fmt('<option value="{}"{}>{}</option>', o, Markup(" selected") if o == value else "", o)
            for o in options
        ]
        return fmt('<select name="{}">{}</select>', name, join(opts))

    def text(name: str, value: str, hint: str) -> Markup:
        return fmt('<input type="text" name="{}" value="{}" placeholder="{}">', name, value, hint)

    return fmt(
        '<form class="filters" method="get" action="/ui/events">'
        "<label>event id {}</label><label>tenant {}</label><label>sink {}</label>"
        "<label>type {}</label><label>chat {}</label><label>state {}</label>"
        "<label>since {}</label><label>until {}</label><label>text in payload {}</label>"
        '<button type="submit" class="primary">Search</button></form>'
        '<p class="muted">An event id is looked up exactly, in every tenant you may see '
        "(or the one chosen), and the other fields are then left aside. The text is matched "
        "in the payload, case-insensitive.</p>",
        text("event_id", s.event_id, "exact id"),
        select("tenant", s.tenant, tenants, "all"),
        text("sink", s.sink, "any"),
        text("type", s.type, "message.* or exact"),
        text("chat", s.chat, "chat id"),
        select("state", s.state, STATES, "any"),
        text("since", s.since, "2h, ISO 8601, unix s"),
        text("until", s.until, "same forms"),
        text("q", s.q, "text"),
    )


def _last_attempt(rec: EventRecord, sink: str, now: float) -> Markup:
    state = next((s for s in rec.sinks if s.sink == sink), None)
    if state is None or not state.attempts:
        return Markup('<td class="muted">none</td>')
    a = state.attempts[-1]
    return fmt(
        '<td>{} <span class="{}">{}</span></td>',
        when(a.at_ms / 1000, now),
        "ok" if a.ok else "bad",
        _said(a),
    )


def _rows(records: list[EventRecord], sink: str, now: float) -> Markup:
    rows = []
    for r in records:
        chat: Markup | str = "—"
        if r.chat_id:
            chat = fmt(
                '<a href="{}"><code>{}</code></a>',
                url("/ui/events", tenant=r.tenant, chat=r.chat_id),
                r.chat_id,
            )
        rows.append(
            fmt(
                '<tr class="event"><td>{}</td><td><code>{}</code></td>'
                '<td><a href="{}"><code>{}</code></a></td><td><code>{}</code></td><td>{}</td>'
                "<td>{}</td>{}</tr>",
                when(r.at_ms / 1000, now),
                r.tenant,
                event_url(r.tenant, r.event_id),
                r.event_id,
                r.type,
                chat,
                join((badge(s.state, f"{s.sink}: {s.state}") for s in r.sinks), " "),
                _last_attempt(r, sink, now) if sink else "",
            )
        )
    return fmt(
        "<table><tr><th>first seen</th><th>tenant</th><th>event id</th><th>type</th>"
        "<th>chat</th><th>sinks</th>{}</tr>{}</table>",
        fmt("<th>last attempt to {}</th>", sink) if sink else "",
        join(rows),
    )


def found_by_id(records: list[EventRecord], event_id: str, looked_in: int, now: float) -> Markup:
    if not records:
        return fmt(
            '<p class="muted">No record of <code>{}</code> in {} tenant(s) (never taken in, '
            "or past the event log's retention).</p>",
            event_id,
            looked_in,
        )
    return fmt('{}<p class="muted">Looked in {} tenant(s).</p>', _rows(records, "", now), looked_in)


def results(page: Page, s: Search, now: float, *, continued: bool) -> Markup:
    older = Markup("")
    if page.cursor is not None:
        older = fmt(
            '<a class="older" href="{}">older →</a>',
            url("/ui/events", **s.fields(), cursor=page.cursor),
        )
    newest = Markup("")
    if continued:
        newest = fmt('<a href="{}">← newest</a>', url("/ui/events", **s.fields()))
    why = ""
    if page.exhausted_scan:
        why = " — the most one search reads; older continues from there"
    summary = fmt(
        '<p class="muted scanned">{} event(s); scanned {} record(s){}. {} {}</p>',
        len(page.records),
        page.scanned,
        why,
        newest,
        older,
    )
    if not page.records:
        return join([Markup('<p class="muted">No events match.</p>'), summary])
    return join([_rows(page.records, s.sink, now), summary])


def _said(a: Attempt) -> str:
    return described(a.status, a.kind)


def _resend_form(rec: EventRecord, sink: str | None, label: str, csrf: str) -> Markup:
    return fmt(
        '<form class="inline" method="post" action="/ui/event/resend">{}'
        '<button type="submit" class="primary">{}</button></form>',
        hidden(csrf=csrf, tenant=rec.tenant, event_id=rec.event_id, sink=sink),
        label,
    )


def _sink_actions(rec: EventRecord, s: SinkState, csrf: str, can_resend: bool) -> Markup:
    if s.state == "not_routed":
        return Markup("")
    if s.state == "dead_letter":
        return fmt(
            '<a href="{}">its dead letter (replay it there)</a>',
            url("/ui/deadletter", tenant=rec.tenant, sink=s.sink, event_id=rec.event_id),
        )
    if s.state in UNDER_WAY:
        return Markup('<span class="muted">a delivery is under way</span>')
    if not can_resend:
        return Markup("")
    return _resend_form(rec, s.sink, "Resend", csrf)


def _attempt_row(a: Attempt) -> Markup:
    answer = a.error or a.excerpt
    stale = Markup("")
    if a.stale:
        stale = Markup(
            ' <span class="bad" title="its run no longer held the delivery: the sink may '
            'have it twice">stale</span>'
        )
    return fmt(
        '<tr class="attempt{}"><td class="num">{}</td><td>{}</td><td class="num">{} ms</td>'
        '<td class="{}">{}{}</td><td class="err">{}</td><td>{}</td></tr>',
        " stale" if a.stale else "",
        a.n,
        stamp(a.at_ms),
        a.ms,
        "ok" if a.ok else "bad",
        _said(a),
        stale,
        answer or "—",
        a.source or "—",
    )


def _sink_section(
    rec: EventRecord, s: SinkState, csrf: str, can_resend: bool, now: float
) -> Markup:
    notes = []
    if s.detail:
        notes.append(fmt("<span>{}</span>", s.detail))
    if s.due_ms is not None and s.state in ("scheduled", "due"):
        notes.append(
            fmt(
                "<span>next attempt at {} ({})</span>",
                stamp(s.due_ms),
                "now" if s.state == "due" else f"in {age(s.due_ms / 1000 - now)}",
            )
        )
    if s.attempts_made > len(s.attempts):
        notes.append(
            fmt(
                '<span class="muted">{} earlier attempt(s) not kept</span>',
                s.attempts_made - len(s.attempts),
            )
        )
    attempts = Markup('<p class="muted">No attempts.</p>')
    if s.attempts:
        attempts = fmt(
            "<table><tr><th>#</th><th>started</th><th>took</th><th>result</th>"
            "<th>error or answer</th><th>queued by</th></tr>{}</table>",
            join(_attempt_row(a) for a in s.attempts),
        )
    return fmt(
        '<section class="sink" id="{}"><h3><code>{}</code> {} {}</h3>'
        '<div class="actions">{}</div>{}</section>',
        f"sink-{s.sink}",
        s.sink,
        badge(s.state),
        join(notes, " · "),
        _sink_actions(rec, s, csrf, can_resend),
        attempts,
    )


def _payload(rec: EventRecord) -> str:
    raw = rec.body
    if not raw:
        return "(the record has no copy of the event)"
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        return raw.decode(errors="replace")


def outcome(results: list[tuple[str, str]]) -> Markup:
    """What a resend did, sink by sink (verdicts as :meth:`EventLog.resend` gives them)."""
    if not results:
        return Markup("")
    items = [
        fmt("<li><code>{}</code>: resent</li>", sink)
        if verdict == "ok"
        else fmt("<li><code>{}</code>: not resent — {}</li>", sink, RESEND_SKIPPED[verdict])
        for sink, verdict in results
    ]
    return fmt('<div class="note result"><ul>{}</ul></div>', join(items))


def event_page(
    rec: EventRecord,
    *,
    csrf: str,
    can_resend: bool,
    now: float,
    resent: list[tuple[str, str]],
) -> Markup:
    items: list[tuple[str, Markup | str]] = [
        ("tenant", fmt("<code>{}</code>", rec.tenant)),
        ("event id", fmt("<code>{}</code>", rec.event_id)),
        ("type", fmt("<code>{}</code>", rec.type)),
        ("chat", fmt("<code>{}</code>", rec.chat_id) if rec.chat_id else "—"),
        (
            "first seen",
            join([Markup(stamp(rec.at_ms)), fmt(" ({} ago)", age(now - rec.at_ms / 1000))]),
        ),
        ("size in the log", f"{rec.size} bytes"),
    ]
    fields_table = fmt(
        '<table class="fields">{}</table>',
        join(fmt("<tr><th>{}</th><td>{}</td></tr>", k, v) for k, v in items),
    )
    arrivals = fmt(
        "<h2>Arrivals</h2><table><tr><th>by</th><th>times</th><th>first at</th></tr>{}</table>",
        join(
            fmt(
                '<tr><td>{}</td><td class="num">{}</td><td>{}</td></tr>',
                a.source,
                a.count,
                stamp(a.first_ms),
            )
            for a in rec.arrivals
        ),
    )
    routed = [s for s in rec.sinks if s.state != "not_routed"]
    to_all = Markup("")
    if can_resend and routed:
        to_all = fmt(
            '<div class="actions">{}</div>', _resend_form(rec, None, "Resend to every sink", csrf)
        )
    timeline = fmt(
        "<h2>Sinks</h2>{}{}",
        to_all,
        join(_sink_section(rec, s, csrf, can_resend, now) for s in rec.sinks),
    )
    return fmt(
        '{}{}{}{}<h2>Payload</h2><pre class="payload">{}</pre>'
        '<p><a href="{}">More of tenant {}</a></p>',
        outcome(resent),
        fields_table,
        arrivals,
        timeline,
        _payload(rec),
        url("/ui/events", tenant=rec.tenant),
        rec.tenant,
    )
