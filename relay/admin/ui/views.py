"""The operator page's views: each function returns escaped HTML (:mod:`.html`) for one
part — the tenant and sink tables (with a sink's pause, resume and test buttons), a test
event's answer, the dead-letter filters and list, one dead letter,
the confirmation of a replay or purge and its result, and the log-in form."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields

from relay.admin.sinks import SinkTestReply
from relay.admin.ui.html import Markup, fmt, hidden, join, url, when
from relay.admin.ui.overview import Overview, SinkState
from relay.delivery import breaker
from relay.delivery.sink_client import described
from relay.store.deadletters import CLASSES, DeadLetter, Outcome

ERROR_CHARS = 300  # of a dead letter's error text in the list (the detail shows it all)
BREAKER_CLASS = {breaker.CLOSED: "ok", breaker.HALF_OPEN: "warn", breaker.OPEN: "bad"}
LEASE_TEXT = {"here": "held here", "elsewhere": "held elsewhere", "nobody": "nobody"}


@dataclass(frozen=True)
class Query:
    """The dead-letter filters as the form gave them (shown again as given)."""

    tenant: str = ""
    sink: str = ""
    cls: str = ""
    type: str = ""
    since: str = ""
    until: str = ""
    limit: str = ""

    def fields(self) -> dict[str, str]:
        """As form fields (``class`` is the field's name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["class"] = out.pop("cls")
        return out


def overview(o: Overview, *, csrf: str = "", can_change: bool = False) -> Markup:
    """The tenant and sink tables and the queue; ``can_change``: a ``replay`` session,
    whose sink rows have pause or resume and test buttons."""
    rows = []
    for t in o.tenants:
        mode = t.configured_mode if t.mode is None else f"{t.configured_mode} (now {t.mode})"
        lease = "—" if t.configured_mode == "off" else LEASE_TEXT[t.lease]
        lease_class = "bad" if t.configured_mode != "off" and t.lease == "nobody" else ""
        rows.append(
            fmt(
                '<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class="{}">{}</td>'
                "<td>{}</td>{}</tr>",
                t.slug,
                when(t.last_webhook, o.now),
                mode,
                lease_class,
                lease,
                "—" if t.configured_mode == "off" else when(t.watermark, o.now),
                join(_count_cell(t.dead_letters[c]) for c in CLASSES),
            )
        )
    tenants = fmt(
        "<h2>Tenants</h2><table><tr><th>tenant</th><th>last webhook</th><th>poll mode</th>"
        "<th>poll lease</th><th>watermark</th>{}</tr>{}</table>",
        join(fmt("<th>{} dead letters</th>", c) for c in CLASSES),
        join(rows),
    )
    return join([tenants, _sinks(o, csrf if can_change else None), _queue(o)])


def _count_cell(n: int | None) -> Markup:
    if n is None:
        return Markup('<td class="num muted">—</td>')
    return fmt('<td class="num{}">{}</td>', " bad" if n else "", n)


def _sinks(o: Overview, csrf: str | None) -> Markup:
    """The sink rows; ``csrf`` (a ``replay`` session's) adds their action buttons."""
    rows = []
    for s in o.sinks:
        dead = s.dead_letters or {}
        rows.append(
            fmt(
                "<tr><td><code>{}</code></td><td><code>{}</code>{}</td>{}"
                '<td class="num">{}</td><td class="num">{}</td>{}{}{}'
                '<td><a href="{}">recent attempts</a></td>{}</tr>',
                s.tenant,
                s.name,
                "" if s.kind == "http" else fmt(' <span class="muted">{}</span>', s.kind),
                _state_cell(s, o.now),
                s.in_flight,
                s.waiting,
                _plain_cell(s.ready),
                _plain_cell(s.scheduled),
                join(_count_cell(None if s.dead_letters is None else dead[c]) for c in CLASSES),
                url("/ui/events", tenant=s.tenant, sink=s.name),
                "" if csrf is None else _sink_actions(s, csrf),
            )
        )
    return fmt(
        "<h2>Sinks</h2><table><tr><th>tenant</th><th>sink</th><th>state</th>"
        "<th>in flight</th><th>waiting</th><th>ready jobs</th><th>scheduled jobs</th>{}"
        "<th>event log</th>{}</tr>"
        "{}</table>",
        join(fmt("<th>{} dead letters</th>", c) for c in CLASSES),
        "" if csrf is None else Markup("<th>actions</th>"),
        join(rows),
    )


def _state_cell(s: SinkState, now: float) -> Markup:
    """Paused (the operator's pause comes first: nothing is sent while it lasts), then
    the sink's breaker; or, once its URL answered 410, *gone* — whatever the breaker
    says, its deliveries then dead-letter without a request."""
    parts = []
    if s.paused_since is not None:
        parts.append(
            fmt(
                '<span class="warn" title="paused by an operator: nothing is sent to it; its '
                'deliveries wait and do not expire until it is resumed">paused</span> '
                '<span class="muted">since {}</span>',
                when(s.paused_since, now),
            )
        )
    if s.gone:
        parts.append(
            Markup(
                '<span class="bad" title="its URL answered 410 Gone: deliveries become gone '
                'dead letters without a request until a replay for this sink or a new URL">'
                "gone (410)</span>"
            )
        )
    else:
        parts.append(
            fmt(
                '<span class="{}">breaker {}</span>',
                BREAKER_CLASS[s.breaker],
                breaker.STATE_NAMES[s.breaker].replace("_", "-"),
            )
        )
    return fmt('<td class="state">{}</td>', join(parts, "<br>"))


def _sink_actions(s: SinkState, csrf: str) -> Markup:
    ident = {"tenant": s.tenant, "sink": s.name}
    switch = "resume" if s.paused_since is not None else "pause"
    return fmt(
        '<td class="row-actions">{}{}</td>',
        _sink_form(switch, switch.capitalize(), ident, csrf),
        _sink_form("test", "Send test event", ident, csrf),
    )


def _sink_form(action: str, label: str, values: dict[str, str], csrf: str) -> Markup:
    return fmt(
        '<form class="inline" method="post" action="/ui/sinks/{}">{}'
        '<button type="submit">{}</button></form>',
        action,
        hidden(csrf=csrf, **values),
        label,
    )


def sink_test(answer: SinkTestReply) -> Markup:
    """What a sink said to a test event."""
    said = described(answer.status, answer.kind)
    return fmt(
        '<p class="note result">Test event to <code>{}/{}</code>: <span class="{}">{}</span> '
        "in {} ms.</p><table><tr><th>event id</th><td><code>{}</code></td></tr>"
        '<tr><th>answer</th><td class="err">{}</td></tr></table>'
        '<p><a href="/ui">Back to the overview</a></p>',
        answer.tenant,
        answer.sink,
        "ok" if answer.ok else "bad",
        said,
        f"{answer.ms:.0f}",
        answer.event_id,
        answer.excerpt or "(empty)",
    )


def _plain_cell(n: int | None) -> Markup:
    return fmt('<td class="num">{}</td>', "—" if n is None else n)


def _queue(o: Overview) -> Markup:
    q = o.queue
    if q is None:
        return Markup("")
    note = "" if q.split else " (too many jobs to split them per sink: totals only)"
    return fmt(
        '<p class="muted">Queue, every sink: {} ready, {} scheduled; the oldest due job has '
        "waited {:}s{}.</p>",
        q.ready,
        q.scheduled,
        f"{q.oldest_ready_age:.1f}",
        note,
    )


def filters(q: Query, tenants: list[str]) -> Markup:
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
        '<h2>Dead letters</h2><form class="filters" method="get" action="/ui">'
        "<label>tenant {}</label><label>sink {}</label><label>class {}</label>"
        "<label>type {}</label><label>since {}</label><label>until {}</label>"
        '<label>limit {}</label><button type="submit">Filter</button></form>',
        select("tenant", q.tenant, tenants, "all"),
        text("sink", q.sink, "any"),
        select("class", q.cls, CLASSES, "any"),
        text("type", q.type, "message.received"),
        text("since", q.since, "2h, ISO 8601, unix s"),
        text("until", q.until, "same forms"),
        text("limit", q.limit, "100"),
    )


def dead_letters(
    found: list[DeadLetter], q: Query, *, more: bool, csrf: str, can_change: bool, now: float
) -> Markup:
    if not found:
        return Markup('<p class="muted">No dead letters match.</p>')
    rows = [_row(d, csrf, can_change, now) for d in found]
    more_note = (
        fmt(
            '<p class="note">Showing the first {}; narrow the filters to see the rest.</p>',
            len(found),
        )
        if more
        else Markup("")
    )
    bulk = Markup("")
    if can_change:
        bulk = fmt(
            '<div class="actions">{}{}</div>',
            _action_form("replay", "Replay all matching…", q.fields(), csrf),
            _action_form("purge", "Purge all matching…", q.fields(), csrf, danger=True),
        )
    return fmt(
        "{}<table><tr><th>dead-lettered</th><th>tenant</th><th>sink</th><th>event id</th>"
        "<th>type</th><th>class</th><th>status</th><th>attempts</th><th>last error</th>{}</tr>"
        "{}</table>{}",
        bulk,
        Markup("<th>actions</th>") if can_change else "",
        join(rows),
        more_note,
    )


def _row(d: DeadLetter, csrf: str, can_change: bool, now: float) -> Markup:
    ident = {"tenant": d.tenant, "sink": d.sink, "event_id": d.event_id}
    error = d.error if len(d.error) <= ERROR_CHARS else d.error[:ERROR_CHARS] + "…"
    actions = Markup("")
    if can_change:
        actions = fmt(
            '<td class="row-actions">{}{}</td>',
            _action_form("replay", "Replay…", ident, csrf),
            _action_form("purge", "Purge…", ident, csrf, danger=True),
        )
    return fmt(
        '<tr class="dead-letter"><td>{}</td><td><code>{}</code></td><td><code>{}</code></td>'
        '<td><a href="{}"><code>{}</code></a></td><td><code>{}</code></td><td>{}</td>'
        '<td class="num">{}</td><td class="num">{}</td><td class="err">{}</td>{}</tr>',
        when(d.dead_lettered_at, now),
        d.tenant,
        d.sink,
        url("/ui/deadletter", **ident),
        d.event_id,
        d.event_type,
        d.cls,
        "—" if d.status is None else d.status,
        d.attempts,
        error,
        actions,
    )


def _action_form(
    action: str, label: str, values: dict[str, str], csrf: str, *, danger: bool = False
) -> Markup:
    return fmt(
        '<form class="inline" method="post" action="/ui/deadletters/{}">{}'
        '<button type="submit" class="{}">{}</button></form>',
        action,
        hidden(csrf=csrf, **{k: v for k, v in values.items() if v}),
        "danger" if danger else "",
        label,
    )


def detail(
    d: DeadLetter, event: bytes | None, *, csrf: str, can_change: bool, now: float
) -> Markup:
    items = [
        ("tenant", d.tenant),
        ("sink", d.sink),
        ("event id", d.event_id),
        ("type", d.event_type),
        ("class", d.cls),
        ("last status", "—" if d.status is None else str(d.status)),
        ("attempts", str(d.attempts)),
    ]
    rows = [fmt("<tr><th>{}</th><td><code>{}</code></td></tr>", k, v) for k, v in items]
    rows += [
        fmt("<tr><th>{}</th><td>{}</td></tr>", k, when(t, now))
        for k, t in (
            ("first attempt", d.first_attempt),
            ("last attempt", d.last_attempt),
            ("dead-lettered", d.dead_lettered_at),
        )
    ]
    rows.append(fmt('<tr><th>last error</th><td class="err">{}</td></tr>', d.error))
    body = "(no longer stored)"
    if event is not None:
        try:
            body = json.dumps(json.loads(event), indent=2, ensure_ascii=False)
        except ValueError:
            body = event.decode(errors="replace")
    actions = Markup("")
    if can_change:
        ident = {"tenant": d.tenant, "sink": d.sink, "event_id": d.event_id}
        actions = fmt(
            '<div class="actions">{}{}</div>',
            _action_form("replay", "Replay…", ident, csrf),
            _action_form("purge", "Purge…", ident, csrf, danger=True),
        )
    return fmt("<table>{}</table>{}<h2>Event</h2><pre>{}</pre>", join(rows), actions, body)


def confirm(
    action: str, found: list[DeadLetter], values: dict[str, str], csrf: str, now: float
) -> Markup:
    """The step before a replay or purge: what it would touch, and one button to go on."""
    if not found:
        return Markup('<p>Nothing matches any more.</p><p><a href="/ui">Back</a></p>')
    verb = {"replay": "Replay", "purge": "Purge"}[action]
    warning = (
        "They go back on the queue with fresh attempts."
        if action == "replay"
        else "They are deleted for good, with their events once nothing else holds them."
    )
    shown = found[:100]
    rows = [
        fmt(
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td><code>{}</code></td>"
            "<td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            d.tenant,
            d.sink,
            d.event_id,
            d.event_type,
            d.cls,
            when(d.dead_lettered_at, now),
        )
        for d in shown
    ]
    rest = len(found) - len(shown)
    return fmt(
        '<p class="note">{} {} dead letter(s)? {}</p><table><tr><th>tenant</th><th>sink</th>'
        "<th>event id</th><th>type</th><th>class</th><th>dead-lettered</th></tr>{}</table>{}"
        '<form class="actions" method="post" action="/ui/deadletters/{}">{}'
        '<button type="submit" class="{}" name="confirm" value="yes">Confirm: {} {}</button>'
        '<a href="/ui">Cancel</a></form>',
        verb,
        len(found),
        warning,
        join(rows),
        fmt('<p class="muted">… and {} more.</p>', rest) if rest else "",
        action,
        hidden(csrf=csrf, **{k: v for k, v in values.items() if v}),
        "primary" if action == "replay" else "danger",
        verb.lower(),
        len(found),
    )


def result(action: str, out: Outcome) -> Markup:
    verb = {"replay": "Replayed", "purge": "Purged"}[action]
    skipped = [
        fmt("<li><code>{}/{}/{}</code>: {}</li>", d.tenant, d.sink, d.event_id, why)
        for d, why in out.skipped
    ]
    return fmt(
        '<p class="note result">{} {} dead letter(s); {} skipped.</p>{}'
        '<p><a href="/ui">Back to the overview</a></p>',
        verb,
        len(out.done),
        len(out.skipped),
        fmt("<ul>{}</ul>", join(skipped)) if skipped else "",
    )


def error(message: str) -> Markup:
    return fmt('<p class="error">{}</p>', message)


def login(nonce: str, message: str | None = None) -> Markup:
    return fmt(
        '<form class="login" method="post" action="/ui/login">{}'
        '<h2>Log in</h2><p class="muted">Paste an admin token (admin.token or an '
        "[[admin.tokens]] entry). It is checked once; the browser then holds only a "
        "session cookie.</p>{}"
        '<input type="password" name="token" autocomplete="off" autofocus required>'
        '<button type="submit" class="primary">Log in</button></form>',
        hidden(nonce=nonce),
        error(message) if message else "",
    )
