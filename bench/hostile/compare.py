"""The relay's receiver beside aiohttp's own server, for the same bytes.

Each answer is reduced to what it says at the HTTP level — the request reached the
application (``app``: any 2xx, or a 4xx only an application gives), the server refused
it (``refused``: 400, 431, 501; ``version``: 505), ``unavailable`` (503) — and the end of the
connection: ``open`` (the sentinel after the case was answered) or ``closed``. Every
difference found must have its reason in :data:`EXPLAINED` (and in
``docs/hostile-input.md``)."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

from bench.hostile.wire import Exchange

APP = {401, 403, 404, 405, 413, 417}

# case kind (a glob) → why the relay answers differently from aiohttp's own server.
EXPLAINED: dict[str, str] = {
    "good_then_bad": (
        "aiohttp drops the requests it read together with a bad one and answers 400 in "
        "their place (taken by the sender as its good request's answer, never retried); "
        "the relay's parser stops after each request: the good one is answered, then 400"
    ),
    "te_underscore": (
        "the same as good_then_bad: the request before the unreadable bytes (here the "
        "chunks of a body whose Transfer_Encoding header means nothing) is answered first"
    ),
    "close_then_more": (
        "bytes after a request that ends the connection (Connection: close): aiohttp drops "
        "that request and answers 400 in its place; the relay answers it and closes, "
        "reading nothing after it (RFC 9112 §9.6)"
    ),
    "http10_*": (
        "the same as close_then_more: an HTTP/1.0 request ends its connection, and aiohttp "
        "drops it for the bytes after it; the relay answers it and closes"
    ),
    "upgrade_then_more": (
        "after a request asking to switch protocols, aiohttp keeps reading HTTP on the "
        "connection and serves the request smuggled after it; the relay offers no upgrade: "
        "it answers and closes, reading nothing after it"
    ),
    "mutated_head: version closed | app closed": (
        "a random edit took the version out of the request line (as in line_no_version)"
    ),
    "line_no_version": (
        "aiohttp's parser reads a request line without a version as HTTP/0.9 and still "
        "reads headers and a body; aiohttp serves it, the relay answers 505"
    ),
    "line_http_0_9": "the same as line_no_version (a bodiless HTTP/0.9 GET: 404 on aiohttp)",
    "line_http_2_0": "HTTP/2.0 in HTTP/1 framing: aiohttp serves it, the relay answers 505",
    "te_gzip_first": (
        "a transfer coding other than chunked: aiohttp's parser ignores it and hands over "
        "the chunks undecoded as the body; the relay answers 501 (RFC 9112 §6.1)"
    ),
}


def verdict_classes(got: Exchange) -> tuple[str, ...]:
    out = []
    for status in got.statuses:
        if 200 <= status < 300 or status in APP:
            out.append("app")
        elif status == 505:
            out.append("version")
        elif status in (400, 431, 501):
            out.append("refused")
        elif status == 503:
            out.append("unavailable")
        else:
            out.append(str(status))
    out.append("open" if got.sentinel else "closed")
    return tuple(out)


@dataclass
class Differences:
    seen: Counter[tuple[str, tuple[str, ...], tuple[str, ...]]] = field(default_factory=Counter)
    # cases refused, but not with the status they expected: (family, kind, answers)
    unexpected: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    # the first bytes that showed each difference
    examples: dict[tuple[str, tuple[str, ...], tuple[str, ...]], bytes] = field(
        default_factory=dict
    )

    def add(self, kind: str, ours: tuple[str, ...], theirs: tuple[str, ...], raw: bytes) -> None:
        self.seen[(kind, ours, theirs)] += 1
        self.examples.setdefault((kind, ours, theirs), raw[:400])

    @staticmethod
    def reason(kind: str, ours: tuple[str, ...], theirs: tuple[str, ...]) -> str | None:
        """Why: the entry for the kind, or for the kind with exactly these answers."""
        exact = f"{kind}: {' '.join(ours)} | {' '.join(theirs)}"
        for pattern, why in EXPLAINED.items():
            if fnmatch.fnmatchcase(kind, pattern) or pattern == exact:
                return why
        return None

    def unexplained(self) -> list[str]:
        return sorted({k for k, o, t in self.seen if self.reason(k, o, t) is None})

    def text(self) -> str:
        lines = ["Differences from aiohttp's own server (case kind: relay | aiohttp x count):"]
        for (kind, ours, theirs), n in sorted(self.seen.items()):
            why = self.reason(kind, ours, theirs)
            lines.append(f"- {kind}: {' '.join(ours)} | {' '.join(theirs)} x {n} — {why}")
            if why is None:
                lines.append(f"  UNEXPLAINED, e.g. {self.examples[(kind, ours, theirs)]!r}")
        if self.unexpected:
            lines.append("\nRefused, but not as the case expected (family/kind: answers x count):")
            for (family, kind, answers), n in sorted(self.unexpected.items()):
                lines.append(f"- {family}/{kind}: {answers} x {n}")
        return "\n".join(lines)

    def to_json(self) -> list[dict[str, object]]:
        return [
            {
                "kind": k,
                "relay": list(o),
                "aiohttp": list(t),
                "count": n,
                "why": self.reason(k, o, t),
            }
            for (k, o, t), n in sorted(self.seen.items())
        ]
