"""``python -m bench.faults [--events N] [--rate R] [--only 1,5] [--json FILE]``.

Runs each scenario on a fresh relay and prints one row per scenario: events sent, acked
(a 2xx to Chert), delivered, lost (acked and never delivered once the relay settled),
duplicates at the sink, seconds to settle, restarts. Exits 1 if any acked event was
lost, or any scenario without a crash delivered one twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.faults.scenarios import SCENARIOS, Run, run_one
from bench.faults.stack import Result


def _machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def table(results: list[Result]) -> str:
    head = (
        "#",
        "scenario",
        "sent",
        "acked",
        "delivered",
        "lost",
        "dups",
        "settle s",
        "restarts",
        "",
    )
    rows = [head]
    for r in results:
        verdict = "ok" if r.ok else ("ERROR " + r.error if r.error else "FAIL")
        dups = f"{r.duplicates}{'*' if r.duplicates_allowed else ''}"
        rows.append(
            (
                r.scenario,
                r.title,
                str(r.sent),
                str(r.acked),
                str(r.delivered),
                str(r.lost),
                dups,
                f"{r.settle_s:.1f}",
                str(r.restarts),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        "* a relay process or Redis crashed or stalled, or the sink answered after its "
        "timeout, in this scenario: duplicates are allowed"
    )
    return "\n".join(lines)


def notes(results: list[Result]) -> str:
    out = []
    for r in results:
        extra = {k: v for k, v in r.notes.items() if k != "status_counts"}
        if extra:
            out.append(f"{r.scenario}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        out += [f"{r.scenario}: FAILED: {why}" for why in r.broken]
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    keys = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    base = Path(args.workdir or tempfile.mkdtemp(prefix="chert-faults-"))
    results = []
    began = time.monotonic()
    for key in keys:
        t0 = time.monotonic()
        run = Run(n=args.events, rate=args.rate, workdir=base / f"s{key}", mount=not args.no_mount)
        print(
            f"scenario {key}: {SCENARIOS[key][0]} ({args.events} events)…",
            file=sys.stderr,
            flush=True,
        )
        res = await run_one(key, run)
        res.notes["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(res)
        print(table([res]).splitlines()[2], file=sys.stderr, flush=True)
        for why in res.broken:
            print(f"  failed: {why}", file=sys.stderr, flush=True)
    print(table(results))
    print(notes(results))
    print(f"total {time.monotonic() - began:.0f}s; logs under {base}")
    for r in results:  # last, where a log's tail shows them
        if not r.ok:
            why = r.error or "; ".join(r.broken) or f"lost {r.lost}, duplicates {r.duplicates}"
            print(f"FAILED scenario {r.scenario} ({r.title}): {why}; settle {r.settle_s} s")
    if args.json:
        Path(args.json).write_text(  # noqa: ASYNC240 - once, after every scenario
            json.dumps(
                {
                    "events": args.events,
                    "rate": args.rate,
                    "machine": _machine(),
                    "results": [{**asdict(r), "ok": r.ok} for r in results],
                },
                indent=2,
            )
        )
    ok = all(r.ok for r in results)
    if ok and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument("--events", type=int, default=1000, help="events per scenario (default 1000)")
    p.add_argument("--rate", type=float, default=200.0, help="webhooks per second (default 200)")
    p.add_argument("--only", help="comma-separated scenario numbers (default: all)")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--workdir", help="where processes keep data and logs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--no-mount",
        action="store_true",
        help="scenario 9 fills Redis' maxmemory instead of mounting a small tmpfs",
    )
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
