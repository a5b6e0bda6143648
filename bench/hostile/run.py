"""Run the hostile-input suite and print its table (see :mod:`bench.hostile`).

    python -m bench.hostile.run [--requests 100000] [--seed 1] [--json results.json]

Exit status 0 when nothing was wrongly accepted, the relay never died, every valid
request after a hostile one was accepted, and every difference from aiohttp's own
server is one :mod:`bench.hostile.differences` explains; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.hostile import admin_cases, body_cases, drawn, http_cases, scenarios, signature_cases
from bench.hostile.cases import Case, Generator, World
from bench.hostile.compare import Differences, verdict_classes
from bench.hostile.target import (
    ADMIN_TOKEN,
    OTHER,
    OTHER_SECRET,
    SECRET,
    TENANT,
    Limits,
    Target,
)
from bench.hostile.wire import Exchange, exchange, signed_request
from relay.keys import Keys
from relay.store.stored_event import parse

KEYS = Keys("chert-relay")

# Shares of the requests, per family of generators (the rest go to the scenarios).
SHARES: list[tuple[str, float]] = [
    ("signature", 0.22),
    ("signature_drawn", 0.03),
    ("body", 0.20),
    ("body_drawn", 0.05),
    ("smuggling", 0.12),
    ("framing", 0.12),
    ("pipelining", 0.04),
    ("admin", 0.12),
    ("admin_drawn", 0.02),
]


@dataclass
class Row:
    family: str
    requests: int = 0
    as_expected: int = 0
    unexpected: int = 0  # refused, but not the way the case expected
    wrongly_accepted: int = 0
    valid_after_refused: int = 0
    compared: int = 0
    differing: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


@dataclass
class Report:
    rows: dict[str, Row] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    crashes: int = 0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    log_lines: int = 0
    log: Counter[str] = field(default_factory=Counter)
    anomalies: Counter[str] = field(default_factory=Counter)  # wrong, but not acceptances
    seconds: float = 0.0
    differences: Differences = field(default_factory=Differences)

    def row(self, family: str) -> Row:
        return self.rows.setdefault(family, Row(family))

    @property
    def total(self) -> Row:
        t = Row("total")
        for r in self.rows.values():
            for name in (
                "requests",
                "as_expected",
                "unexpected",
                "wrongly_accepted",
                "valid_after_refused",
                "compared",
                "differing",
            ):
                setattr(t, name, getattr(t, name) + getattr(r, name))
        return t

    @property
    def ok(self) -> bool:
        t = self.total
        return (
            t.wrongly_accepted == 0
            and self.crashes == 0
            and t.valid_after_refused == 0
            and not self.differences.unexplained()
            and not self.anomalies
        )


class Checker:
    """Runs one case against the relay and decides what happened."""

    def __init__(self, target: Target, report: Report, world: World) -> None:
        self.target = target
        self.report = report
        self.world = world
        self.per_event = 0  # Redis keys one accepted event adds
        self.dbsize = target.dbsize()

    def calibrate(self) -> None:
        """How many keys one event adds (after a first one made the per-tenant ones)."""
        w = self.world
        _, other = w.body(partner_id=w.other_tenant)  # both tenants' own keys made
        first = signed_request(w.other_secret, other, path=f"/webhooks/chert/{w.other_tenant}")
        for raw in (first, w.valid()[0]):
            got = exchange(self.target.receiver, [raw], expect=1, sentinel=False)
            assert got.statuses == [202], got
        raw, _ = self.world.valid()
        before = self.target.dbsize()
        exchange(self.target.receiver, [raw], expect=1, sentinel=False)
        self.per_event = self.target.dbsize() - before
        self.dbsize = self.target.dbsize()

    def run(self, case: Case) -> None:
        row = self.report.row(case.family)
        row.requests += 1
        address = self.target.admin if case.target == "admin" else self.target.receiver
        seen_before = self._seen(case)
        log_before = self._log_keys(case)
        try:
            got = exchange(
                address, case.parts, expect=len(case.expect), pause=case.pause, timeout=case.timeout
            )
        except OSError as e:
            got = Exchange(closed=True, reset=True)
            if not self.target.alive():
                self._fail(case, f"the relay died: {e}")
        row.statuses.update(got.statuses or [0])
        wrong = self._wrongly_accepted(case, got, seen_before, log_before)
        if wrong:
            row.wrongly_accepted += 1
            self._fail(case, f"wrongly accepted: {wrong}; answers {got.statuses}")
        elif _as_expected(case, got):
            row.as_expected += 1
        else:
            row.unexpected += 1
            self.report.differences.unexpected[(case.family, case.kind, _sig(got))] += 1
        if not self.target.alive():
            self.report.crashes += 1
            self._fail(case, "the relay process is gone")
            raise SystemExit(self._crash_text())
        if not self._valid_after():
            row.valid_after_refused += 1
            self._fail(case, "a valid webhook right after it was not accepted")
        if case.compare:
            bare = exchange(
                self.target.bare,
                case.parts,
                expect=len(case.expect),
                pause=case.pause,
                timeout=case.timeout,
            )
            row.compared += 1
            ours, theirs = verdict_classes(got), verdict_classes(bare)
            if ours != theirs:
                row.differing += 1
                self.report.differences.add(case.kind, ours, theirs, b"".join(case.parts))

    def _seen(self, case: Case) -> set[str]:
        """Which of the case's signed events Redis has already seen."""
        redis = self.target.redis
        assert redis is not None
        if not case.legit:
            return set()
        keys = [KEYS.seen(lg.tenant, lg.event_id) for lg in case.legit]
        with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            found = pipe.execute()
        return {lg.event_id for lg, n in zip(case.legit, found, strict=True) if n}

    def _log_keys(self, case: Case) -> int:
        """How many of the event log's keys a case's signed events may add exist: their
        records (a duplicate's arrival writes one) and the log's byte count."""
        redis = self.target.redis
        assert redis is not None
        if not case.legit:
            return 0
        keys = [KEYS.event_log(lg.tenant, lg.event_id) for lg in case.legit]
        with redis.pipeline(transaction=False) as pipe:
            pipe.exists(*keys, KEYS.event_log_bytes)
            (found,) = pipe.execute()
        return int(found)

    def _wrongly_accepted(
        self, case: Case, got: Exchange, seen_before: set[str], log_before: int
    ) -> str:
        """Why what happened is an acceptance that should not be, or ''."""
        now = self.target.dbsize()
        added, self.dbsize = now - self.dbsize, now
        added -= self._log_keys(case) - log_before  # a duplicate's arrival, on its record
        for i, a in enumerate(got.answers):
            if 200 <= a.status < 300:
                allowed = case.expect[i] if i < len(case.expect) else frozenset()
                if 202 in allowed:
                    allowed |= {200}  # a legit event seen before: a duplicate
                if a.status not in allowed and not case.unauthorized:
                    return f"answer {i + 1} is {a.status}"
                if case.unauthorized and _api_data(a.body):
                    return f"API data without a valid token ({a.status})"
        if case.target == "admin":
            return f"Redis changed by {added} keys" if added else ""
        stored = [lg for lg in case.legit if lg.event_id not in seen_before]
        stored = [lg for lg in stored if lg.event_id in self._seen(case)]
        if added != len(stored) * self.per_event:
            return f"Redis has {added} new keys for {len(stored)} new signed events"
        answered = sum(1 for a in got.answers if a.status == 202)
        if answered > len(stored):
            self._fail(case, f"{answered} answered 202 but {len(stored)} events stored (lost)")
            self.report.anomalies["accepted but not stored"] += 1
        elif answered < len(stored):
            # Not a wrong acceptance (the events are the signed ones), but not right.
            self._fail(case, f"{len(stored)} new events stored, {answered} answered 202")
            self.report.anomalies["new event not answered 202"] += 1
        assert self.target.redis is not None
        for lg in stored:
            raw: bytes | None = self.target.redis.get(KEYS.event(lg.tenant, lg.event_id))  # type: ignore[assignment]
            if raw is not None and parse(raw).body != lg.stored:
                return f"event {lg.event_id} stored with a body that was not signed"
        return ""

    def _valid_after(self) -> bool:
        raw, _ = self.world.valid()
        got = exchange(self.target.receiver, [raw], expect=1, sentinel=False)
        now = self.target.dbsize()
        ok = got.statuses == [202] and now - self.dbsize == self.per_event
        self.dbsize = now
        return ok

    def _fail(self, case: Case, why: str) -> None:
        if len(self.report.failures) < 200:
            self.report.failures.append(
                f"{case.family}/{case.kind}: {why}: {case.parts[0][:300]!r}"
            )
        # Whole, for a post-mortem (the run's directory, kept with --keep).
        with (self.target.directory / "failures.jsonl").open("a") as f:
            parts = [p.decode("latin-1") for p in case.parts]
            f.write(json.dumps({"kind": case.kind, "why": why, "parts": parts}) + "\n")

    def _crash_text(self) -> str:
        return "the relay died:\n" + self.target.log_tail()


def _as_expected(case: Case, got: Exchange) -> bool:
    if got.timed_out and len(got.answers) < len(case.expect):
        return False
    for i, allowed in enumerate(case.expect):
        status = got.statuses[i] if i < len(got.statuses) else 0
        if status == 200 and 202 in allowed:
            continue  # a legit event seen before: a duplicate
        if status not in allowed:
            return False
    return len(got.answers) <= len(case.expect)


def _sig(got: Exchange) -> str:
    return ",".join(map(str, got.statuses)) + (" closed" if got.closed and not got.sentinel else "")


def _api_data(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and any(k in data for k in admin_cases.API_KEYS)


def plan(world: World, size: int, seed: int) -> Iterator[Case]:
    """The cases of one run, families interleaved (so that nothing depends on order)."""
    counts = {name: int(size * share) for name, share in SHARES}
    gens: dict[str, list[Generator]] = {
        "signature": signature_cases.SIGNATURE,
        "body": body_cases.BODY,
        "smuggling": http_cases.SMUGGLING,
        "framing": http_cases.FRAMING,
        "pipelining": http_cases.PIPELINING,
        "admin": admin_cases.ADMIN,
    }
    drawn_cases: dict[str, list[Callable[[], Case]]] = {
        "signature_drawn": [
            functools.partial(signature_cases.signature_text, world, v)
            for v in drawn.draw(drawn.signature_headers(), counts["signature_drawn"], seed)
        ],
        "body_drawn": [
            functools.partial(body_cases.drawn_body, world, b)
            for b in drawn.draw(drawn.json_bodies(world.tenant), counts["body_drawn"], seed)
        ],
        "admin_drawn": [
            functools.partial(admin_cases.drawn_path, world, p)
            for p in drawn.draw(drawn.admin_paths(), counts["admin_drawn"], seed)
        ],
    }
    slots = [name for name, _ in SHARES for _ in range(counts[name])]
    world.rng.shuffle(slots)
    drawn_iters = {k: iter(v) for k, v in drawn_cases.items()}
    for name in slots:
        if name in drawn_iters:
            make = next(drawn_iters[name], None)
            if make is not None:
                yield make()
        else:
            yield world.rng.choice(gens[name])(world)


async def _scenarios(target: Target, world: World, budget: int) -> list[scenarios.Outcome]:
    """The scenarios, sending ``budget`` hostile requests (connections) in all."""
    crowd = max(2 * target.limits.max_connections, min(2000, budget // 4))
    out = [
        await scenarios.idle_crowd(target, world, crowd),
        await scenarios.busy_crowd(target, world),
    ]
    slow = await asyncio.gather(
        scenarios.slow_heads(target, world, 20), scenarios.slow_bodies(target, world, 20)
    )
    out += slow
    left = budget - sum(o.requests for o in out)
    each = max(50, left // 2 // 5 // 50 * 50)  # five clients, in writes of 50 requests
    out.append(await scenarios.unread_answers(target, world, 5, each))
    out.append(await scenarios.long_pipeline(target, world, max(100, left - 5 * each)))
    return out


def run(
    size: int,
    seed: int,
    directory: Path,
    limits: Limits | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    limits = limits or Limits()
    report = Report()
    target = Target(directory, limits)
    started = time.monotonic()
    target.start()
    try:
        world = World(
            TENANT,
            SECRET,
            OTHER,
            OTHER_SECRET,
            ADMIN_TOKEN,
            limits.max_body,
            limits.tolerance,
            random.Random(seed),
        )
        checker = Checker(target, report, world)
        checker.calibrate()
        report.rss_before_kib = report.rss_peak_kib = target.rss_kib()
        logs_before = target.log_size()
        planned = sum(int(size * share) for _, share in SHARES)
        # Made as they are sent: a timestamp is signed just before it is checked.
        for n, case in enumerate(plan(world, size, seed), 1):
            checker.run(case)
            if n % 250 == 0:
                report.rss_peak_kib = max(report.rss_peak_kib, target.rss_kib())
                if progress is not None:
                    wrong = report.total.wrongly_accepted
                    progress(f"{n}/{planned} cases, {wrong} wrongly accepted")
        before = target.dbsize()
        budget = max(400, size - planned)
        for outcome in asyncio.run(_scenarios(target, world, budget)):
            row = report.row(outcome.family)
            row.requests += outcome.requests
            row.as_expected += outcome.as_expected
            row.unexpected += outcome.requests - outcome.as_expected - outcome.wrongly_accepted
            row.wrongly_accepted += outcome.wrongly_accepted
            report.failures += [f"{outcome.family}/{outcome.kind}: {n}" for n in outcome.notes]
            report.rss_peak_kib = max(report.rss_peak_kib, target.rss_kib())
            before += outcome.accepted_valid * checker.per_event
        if target.dbsize() != before:
            report.row("connection crowds").wrongly_accepted += 1
            report.failures.append(
                f"Redis changed during the scenarios: {target.dbsize() - before}"
            )
        checker.dbsize = target.dbsize()
        if not checker._valid_after():
            report.failures.append("a valid webhook after the scenarios was not accepted")
            report.row("connection crowds").valid_after_refused += 1
        report.crashes += 0 if target.alive() else 1
        report.rss_after_kib = target.rss_kib()
        report.rss_peak_kib = max(report.rss_peak_kib, report.rss_after_kib)
        report.log = target.log_summary(logs_before)
        report.log_lines = sum(report.log.values())
    finally:
        target.stop()
    report.seconds = time.monotonic() - started
    return report


COLUMNS = (
    "family",
    "requests",
    "as expected",
    "refused otherwise",
    "wrongly accepted",
    "valid after refused",
    "compared with aiohttp",
    "differing",
)


def table(report: Report) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    for r in [*report.rows.values(), report.total]:
        name = f"**{r.family}**" if r.family == "total" else r.family
        values = (
            r.requests,
            r.as_expected,
            r.unexpected,
            r.wrongly_accepted,
            r.valid_after_refused,
            r.compared,
            r.differing,
        )
        lines.append(f"| {name} | " + " | ".join(f"{v:,}" for v in values) + " |")
    mib = [report.rss_before_kib / 1024, report.rss_peak_kib / 1024, report.rss_after_kib / 1024]
    lines += [
        "",
        f"Crashes: {report.crashes}. Relay RSS: {mib[0]:.1f} MiB before, {mib[1]:.1f} MiB at "
        f"peak, {mib[2]:.1f} MiB after. Log lines written: {report.log_lines:,}. "
        f"Run time: {report.seconds:.0f} s.",
    ]
    if report.anomalies:
        lines.append("Anomalies: " + ", ".join(f"{k} x {n}" for k, n in report.anomalies.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        report = run(
            args.requests, args.seed, directory, progress=lambda s: print(s, file=sys.stderr)
        )
    print(table(report))
    print()
    print(report.differences.text())
    print("\nLog lines written during the run (level logger: message start x count):")
    for line, n in report.log.most_common():
        print(f"- {line} x {n:,}")
    if report.failures:
        print("\nFailures:")
        print("\n".join(report.failures))
    if args.json is not None:
        out: dict[str, Any] = {
            "rows": {
                k: {**asdict(v), "statuses": dict(v.statuses)} for k, v in report.rows.items()
            },
            "crashes": report.crashes,
            "rss_kib": [report.rss_before_kib, report.rss_peak_kib, report.rss_after_kib],
            "log_lines": report.log_lines,
            "log": dict(report.log),
            "failures": report.failures,
            "anomalies": dict(report.anomalies),
            "differences": report.differences.to_json(),
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
