"""A sink's ``rate``: does the limiter hold its pace, and does a sink without one drain
as before? Same run, same sink, same Redis settings for every figure.

- **paced**: for each configured rate (``--rates``, default ``50/s`` and ``500/s``),
  ``--paced-seconds`` of its events are queued for one sink (``concurrency`` 16, or
  ``--concurrency``) in a redis-server (AOF, ``appendfsync always``, as in
  ``bench/drain.py``), then one ``chert-relay worker`` process drains them to
  ``bench/sinkserver.py``. The achieved pace is (arrivals - 1) / (last arrival - first
  arrival), and also over the middle 80% of the arrivals (the start, when the whole
  backlog is promised turns or set aside, and the end left out); the section prints
  them, their ratio to the configured rate, the most arrivals
  in any one second against the documented bound (rate + burst, burst = 1 + max(1,
  rate x 0.05 s)), and the worker's CPU per delivery (start-up included).
- **unpaced**: ``--events`` events for the same sink without a ``rate`` key, drained
  by this code and by the code of ``--base`` (a git ref, default the commit where this
  branch left ``main``, exported
  into a temporary directory with ``git archive``), taking turns going first; the
  ratio of their deliveries/s (first 2xx to last) shows what the limiter costs a sink
  that does not use it.

    python bench/rate.py [--rates 50/s,500/s] [--paced-seconds 8] [--events 3000]
        [--rounds 2] [--base REF] [--concurrency 16] [--no-base]

``--rates ""`` runs the unpaced section alone; ``--no-base`` the paced one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import drain as drain_py  # noqa: E402
from e2e import get_json  # noqa: E402
from receiver import stop, wait_port  # noqa: E402
from sinkserver import start_sink  # noqa: E402

from relay.config.values import parse_rate  # noqa: E402
from relay.store.embedded import EmbeddedRedis, free_port  # noqa: E402


def burst(per_s: float) -> int:
    return 1 + max(1, int(per_s * 0.05))


def most_in_a_second(times: list[float]) -> int:
    """The most arrivals in any window of one second (two pointers over sorted times)."""
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


CONCURRENCY = [16]  # the sink's concurrency (--concurrency)


def run(work: Path, sink: str, events: int, rate: str | None, code: Path) -> dict[str, float]:
    """Queue ``events`` for one sink (with ``rate``, if given) and drain them with one
    worker running ``code``'s relay; the arrivals' pace and densest second."""
    get_json(f"{sink}/reset", "POST")
    work.mkdir()
    redis = EmbeddedRedis(work / "redis", port=free_port())
    asyncio.run(redis.start())
    try:
        data = drain_py.config(redis.url, sink, 1, CONCURRENCY[0], None, None)
        if rate is not None:
            data["tenants"][0]["sinks"][0]["rate"] = rate
        path = work / "relay.toml"
        path.write_text(drain_py.toml(data))
        asyncio.run(drain_py.fill(data, events, work.name))
        cmd = [sys.executable, "-m", "relay", "--log-level", "warning", "-c", str(path), "worker"]
        proc = subprocess.Popen(cmd, cwd=code)
        try:
            deadline = time.monotonic() + 600
            while get_json(f"{sink}/stats")["unique"] < events:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{work.name}: the worker stopped before the drain ended")
                time.sleep(0.2)
            cpu = drain_py.cpu_s(proc.pid)
        finally:
            stop(proc)
    finally:
        asyncio.run(redis.stop())
    times = sorted(get_json(f"{sink}/dump").values())
    span = times[-1] - times[0]
    lo, hi = len(times) // 10, len(times) * 9 // 10  # the middle 80%: no start, no end
    return {
        "steady_s": (hi - lo) / (times[hi] - times[lo]),
        "per_s": (len(times) - 1) / span,
        "densest_s": most_in_a_second(times),
        "cpu_ms": cpu * 1000 / events,
    }


def export(ref: str, into: Path) -> Path:
    """``ref``'s tree (the relay package) in ``into``, by ``git archive``."""
    into.mkdir(parents=True)
    tar = into / "base.tar"
    subprocess.run(["git", "archive", "-o", str(tar), ref, "relay"], cwd=ROOT, check=True)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    found = subprocess.run(
        [sys.executable, "-c", "import relay; print(relay.__file__)"],
        cwd=into, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not found.startswith(str(into)):
        raise SystemExit(f"the base code's worker would run {found}, not {ref}'s")
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="50/s,500/s")
    ap.add_argument("--paced-seconds", type=float, default=8.0)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-base", action="store_true", help="paced runs only")
    ap.add_argument("--base", default=None, help="default: where this branch left main")
    args = ap.parse_args()
    CONCURRENCY[0] = args.concurrency
    port = free_port()
    sink_proc = start_sink(port)
    drain_py.SINK_PID.append(sink_proc.pid)
    wait_port(port)
    sink = f"http://127.0.0.1:{port}"
    if args.base is None:
        args.base = subprocess.run(
            ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    base_sha = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    head_sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
            base = export(args.base, Path(tmp) / "base-code")
            paced: dict[str, list[dict[str, float]]] = {}
            unpaced: dict[str, list[dict[str, float]]] = {"this": [], "base": []}
            for r in range(args.rounds):
                for rate in filter(None, args.rates.split(",")):
                    per_s = parse_rate(rate)
                    n = int(per_s * args.paced_seconds)
                    found = run(Path(tmp) / f"paced-{r}-{per_s:g}", sink, n, rate, ROOT)
                    paced.setdefault(rate, []).append(found)
                if args.no_base:
                    continue
                order = [("this", ROOT), ("base", base)]
                if r % 2:
                    order.reverse()
                for name, code in order:
                    found = run(Path(tmp) / f"unpaced-{r}-{name}", sink, args.events, None, code)
                    unpaced[name].append(found)
    finally:
        stop(sink_proc)
    print(f"this code {head_sha}, base {args.base} ({base_sha}); {args.rounds} round(s)")
    for rate, runs in paced.items():
        per_s = parse_rate(rate)
        got = [x["per_s"] for x in runs]
        steady = ", ".join(f"{x['steady_s'] / per_s:.3f}" for x in runs)
        densest = max(int(x["densest_s"]) for x in runs)
        cpu = statistics.median(x["cpu_ms"] for x in runs)
        ratios = ", ".join(f"{g / per_s:.3f}" for g in got)
        print(
            f"rate {rate}: {int(per_s * args.paced_seconds)} events, achieved "
            f"{statistics.median(got):.1f}/s (achieved/configured per round: {ratios}; "
            f"the middle 80% of arrivals: {steady}); "
            f"densest second {densest} (bound {per_s:g} + burst {burst(per_s)}); "
            f"worker CPU {cpu:.2f} ms/delivery"
        )
    if args.no_base:
        return

    def median(key: str, name: str) -> float:
        return statistics.median(x[key] for x in unpaced[name])

    this, other = median("per_s", "this"), median("per_s", "base")
    cpu_this, cpu_base = median("cpu_ms", "this"), median("cpu_ms", "base")
    pairs = zip(unpaced["this"], unpaced["base"], strict=True)
    rounds = ", ".join(f"{a['per_s']:.0f}/{b['per_s']:.0f}" for a, b in pairs)
    print(
        f"no rate, {args.events} events: this {this:.0f}/s, base {other:.0f}/s, "
        f"ratio {this / other:.3f} (per round, this/base: {rounds}); worker CPU "
        f"{cpu_this:.2f} vs {cpu_base:.2f} ms/delivery"
    )


if __name__ == "__main__":
    main()
