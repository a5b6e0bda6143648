"""HTML for the operator page, escaped by construction.

Everything the page shows that comes from events or sinks — event types and ids, error
texts, sink names — is attacker-influenced. So no value reaches the page as text:
:func:`fmt` fills a template whose every argument is escaped (quotes included: values
may land in attributes, always double-quoted) unless it is already markup, and
:func:`page` wraps a body in the one layout. No script is ever served; the style sheet
is a file of its own (``style.css``), so the Content-Security-Policy can forbid inline
code altogether.

Markup is markupsafe's :class:`~markupsafe.Markup` (what Jinja uses): text that is
already HTML, which escapes whatever is added to it (``+``, ``%``, ``join``,
``format``). A value is escaped here by the standard library's ``html.escape`` (quotes
spelt ``&quot;`` and ``&#x27;``, as the page has always served them), before markupsafe
sees it, so the page reads the same whichever way a value came in.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlencode

from markupsafe import Markup

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 10px 24px; display: flex;
  align-items: center; gap: 16px; }
header h1 { font-size: 17px; margin: 0; flex: 1; }
header a { color: #fff; text-decoration: none; }
header form { margin: 0; }
header nav { display: flex; gap: 12px; }
header input { width: 16em; }
main { padding: 8px 24px 32px; }
h2 { font-size: 15px; margin: 22px 0 8px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border-bottom: 1px solid #e2e5ea; padding: 5px 8px; text-align: left;
  vertical-align: top; }
th { background: #eef0f4; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.err { max-width: 420px; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
  font-size: 12px; }
td code { white-space: nowrap; }
td.row-actions { white-space: nowrap; }
td.row-actions form + form { margin-left: 4px; }
code, pre { font-family: ui-monospace, monospace; font-size: 12px; }
pre { background: #fff; border: 1px solid #e2e5ea; padding: 10px; overflow: auto; }
.ok { color: #17803d; } .warn { color: #a15c00; } .bad { color: #b42318; font-weight: 600; }
.muted { color: #667085; }
.note { background: #fff8e6; border: 1px solid #f2d38a; padding: 8px 12px; margin: 10px 0; }
.error { background: #fdecec; border: 1px solid #f1a7a7; padding: 8px 12px; margin: 10px 0; }
form.filters { display: flex; flex-wrap: wrap; gap: 8px; align-items: end;
  background: #fff; padding: 10px; border: 1px solid #e2e5ea; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; gap: 2px; }
form.inline { display: inline; margin: 0; }
input, select, button { font: inherit; padding: 3px 6px; }
button { cursor: pointer; border: 1px solid #98a2b3; background: #fff; border-radius: 4px; }
button.danger { border-color: #b42318; color: #b42318; }
button.primary { background: #1d4ed8; border-color: #1d4ed8; color: #fff; }
.login { max-width: 380px; margin: 80px auto; background: #fff; padding: 24px;
  border: 1px solid #e2e5ea; }
.login input { width: 100%; box-sizing: border-box; margin: 6px 0 12px; }
.actions { display: flex; gap: 8px; margin: 12px 0; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eef0f4;
  font-size: 12px; white-space: nowrap; }
section.sink { background: #fff; border: 1px solid #e2e5ea; padding: 4px 12px 10px;
  margin: 10px 0; }
section.sink h3 { font-size: 14px; margin: 8px 0 4px; font-weight: normal; }
section.sink h3 code { font-weight: 600; }
tr.stale td { background: #fff8e6; }
table.fields { width: auto; }
pre.payload { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


__all__ = ["Markup", "age", "escape", "fmt", "hidden", "join", "page", "url", "when"]


def escape(value: object) -> Markup:
    """``value`` as HTML text: markup (anything with ``__html__``) as it is, ``None`` as
    nothing, anything else escaped, quotes included."""
    if isinstance(value, Markup):
        return value
    if hasattr(value, "__html__"):
        return Markup(value)
    return Markup(html.escape("" if value is None else str(value), quote=True))


def fmt(template: str, *args: object, **kwargs: object) -> Markup:
    """``template.format`` with every argument escaped (markup stays as it is).

    Only this module's literal templates are templates: a value is never one.
    """
    return Markup(template).format(
        *(escape(a) for a in args), **{k: escape(v) for k, v in kwargs.items()}
    )


def join(parts: Iterable[Markup], sep: str = "") -> Markup:
    return Markup(sep).join(escape(p) for p in parts)


def url(path: str, **query: object) -> str:
    """A path on this listener with a query string (empty values left out)."""
    q = {k: str(v) for k, v in query.items() if v is not None and v != ""}
    return f"{path}?{urlencode(q)}" if q else path


def when(ts: float | None, now: float) -> Markup:
    """``2026-05-24 01:35:34Z (3m ago)``, or a dash."""
    if ts is None:
        return Markup('<span class="muted">never</span>')
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return fmt('{} <span class="muted">({} ago)</span>', stamp, age(now - ts))


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def hidden(**fields: object) -> Markup:
    return join(
        fmt('<input type="hidden" name="{}" value="{}">', k, v)
        for k, v in fields.items()
        if v is not None
    )


def page(title: str, body: Markup, *, who: str | None = None, csrf: str | None = None) -> str:
    """The whole document: ``body`` under a header naming the token and a log-out button."""
    bar = Markup("")
    if who is not None and csrf is not None:
        bar = fmt(
            '<nav><a href="/ui">Overview</a><a href="/ui/events">Events</a></nav>'
            '<form method="get" action="/ui/events"><input type="search" name="event_id" '
            'placeholder="find an event by id" aria-label="event id"></form>'
            '<span class="muted">token {}</span>'
            '<form method="post" action="/ui/logout">{}<button type="submit">Log out</button>'
            "</form>",
            who,
            hidden(csrf=csrf),
        )
    return fmt(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        '<title>{} · chert-relay</title><link rel="stylesheet" href="/ui/style.css"></head>'
        '<body><header><h1><a href="/ui" class="home">chert-relay</a> · {}</h1>{}</header>'
        "<main>{}</main></body></html>\n",
        title,
        title,
        bar,
        body,
    )
