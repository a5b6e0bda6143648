"""Receiver throughput: the full relay path against a bare aiohttp handler, same run.

Both servers get the same load generator (wrk, 1 thread) replaying the same pre-signed
requests, each with a distinct event id (~1.3 KB ``message.received`` envelopes), at
each of several concurrencies (32 and 128 connections by default). Two more baselines
show where the difference lies: the same bare handler on aiohttp's low-level server
(``bare-ll``) and on the relay's own HTTP server (``bare-own``). The relay runs as
``chert-relay serve`` on its embedded default (private redis-server, AOF with
``appendfsync always``), so every 202 it counts was fsynced. Prints requests/s,
p50/p99 latency and the ratio at each concurrency, and the ratio of throughputs:
each server at its best concurrency.

    python bench/receiver.py [--duration 10] [--connections 32,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.signing import chert_signature  # noqa: E402
from relay.store.embedded import free_port  # noqa: E402

SECRET = "3b5f0c8e2d9a4e6f8b1c7d2e5a9f0b3c4d6e8f1a2b5c7d9e0f3a6b8c1d4e7f90"
TENANT = "acme-7a3f"

WRK_SCRIPT = r"""
local data = dofile(os.getenv("BENCH_DATA"))
local prefix, suffix, n = data.prefix, data.suffix, #data.ids
local i = 0
local reqs = {}
init = function(args)
  for k = 1, n do
    local body = prefix .. data.ids[k] .. suffix
    reqs[k] = wrk.format("POST", "/webhooks/chert/%s", {
      ["Content-Type"] = "application/json",
      ["X-Webhook-Signature"] = "t=" .. data.ts .. ",v1=" .. data.sigs[k],
    }, body)
  end
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end
""".replace("%s", TENANT)


def envelope_parts() -> tuple[str, str]:
    text = "Sure, what time works for you tomorrow? " * 12
    body = {
        "event": "message.received",
        "event_id": "@@ID@@",
        "timestamp": "2026-05-24T01:35:34.000Z",
        "api_version": "v1",
        "webhook_version": "2026-05-04",
        "event_type": "message.received",
        "trace_id": "4f1c9e0a7b3d",
        "partner_id": TENANT,
        "data": {
            "chat": {
                "id": "17f6e9ed-5b6a-4c1e-9a7f-2b8d3c4e5f60",
                "is_group": False,
                "handles": [
                    {"handle": "+14152165723", "service": "imessage", "is_me": True},
                    {"handle": "+14155551234", "service": "imessage", "is_me": False},
                ],
            },
            "message": {
                "id": "0D36042D-C551-4CB4-9BE7-853832D6F2FE",
                "direction": "inbound",
                "sender_handle": {"handle": "+14155551234", "service": "imessage", "is_me": False},
                "parts": [{"type": "text", "value": text}],
            },
        },
    }
    prefix, suffix = json.dumps(body, separators=(",", ":")).split("@@ID@@")
    return prefix, suffix


def write_data(path: Path, count: int) -> int:
    prefix, suffix = envelope_parts()
    ts = int(time.time())
    ids = [f"chert:msg:bench-{ts}-{i:07d}" for i in range(count)]
    sigs = [chert_signature(SECRET, ts, f"{prefix}{i}{suffix}".encode()) for i in ids]

    def lua_str(s: str) -> str:
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"

    path.write_text(
        "return {prefix=" + lua_str(prefix) + ", suffix=" + lua_str(suffix) + f", ts={ts},\n"
        "ids={" + ",".join(lua_str(i) for i in ids) + "},\n"
        "sigs={" + ",".join(lua_str(s) for s in sigs) + "}}\n"
    )
    return len(prefix) + len(suffix) + len(ids[0])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    port: int, script: Path, data: Path, duration: int, connections: int
) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_DATA": str(data)},
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"\s(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)", out)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50_ms": lat.get("50", 0.0),
        "p99_ms": lat.get("99", 0.0),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def start_bare(*extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare.py"), str(port), *extra])
    wait_port(port)
    return proc, port


def start_relay(
    workdir: Path, redis: str = "", extra: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """``chert-relay serve`` on the embedded default, or on ``redis`` (a ``[redis]``
    section's lines); ``extra``: more TOML, appended (e.g. an ``[event_log]`` section)."""
    port, admin = free_port(), free_port()
    cfg = workdir / "relay.toml"
    section = f"[redis]\n{redis}\n" if redis else ""
    cfg.write_text(
        section
        + f"""
[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
[relay]
state_dir = "{workdir / "state"}"
[[tenants]]
slug = "{TENANT}"
webhook_secrets = ["{SECRET}"]
poll = {{ mode = "off" }}
[[tenants.sinks]]
name = "crm"
url = "http://127.0.0.1:9/crm"
events = ["message.received"]
[[tenants.sinks]]
name = "all"
url = "http://127.0.0.1:9/all"
"""
        + extra
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "--log-level", "warning", "--config", str(cfg), "serve"],
        cwd=ROOT,
    )
    wait_http(f"http://127.0.0.1:{admin}/readyz")
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument(
        "--connections",
        default="32,128",
        help="wrk connections, comma-separated: each server is measured at each",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=120_000)
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        script, data = work / "bench.lua", work / "data.lua"
        script.write_text(WRK_SCRIPT)
        size = write_data(data, args.requests)
        print(
            f"{args.requests} pre-signed requests, body {size} bytes, wrk -t1 "
            f"-c{','.join(map(str, conns))} -d{args.duration}s, {args.rounds} round(s)"
        )
        names = ("bare", "bare-ll", "bare-own", "relay")
        results: dict[tuple[str, int], list[dict[str, float]]] = {
            (name, c): [] for name in names for c in conns
        }
        for r in range(args.rounds):
            for c in conns:
                for name in names:
                    if name == "bare":
                        proc, port = start_bare()
                    elif name == "bare-ll":
                        proc, port = start_bare("--low-level")
                    elif name == "bare-own":
                        proc, port = start_bare("--own-server")
                    else:
                        rdir = work / f"relay{r}-{c}"
                        rdir.mkdir()
                        proc, port = start_relay(rdir)
                    try:
                        res = run_wrk(port, script, data, args.duration, c)
                    finally:
                        stop(proc)
                    results[name, c].append(res)
                    print(
                        f"  round {r + 1} c={c:<4d} {name:7s}: {res['rps']:8.0f} req/s"
                        f"  p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms"
                        f"  non-2xx {res['non2xx']:.0f}"
                    )
        for c in conns:
            best = {name: max(results[name, c], key=lambda x: x["rps"]) for name in names}
            rounds = ", ".join(
                f"{rl['rps'] / b['rps']:.2f}"
                for rl, b in zip(results["relay", c], results["bare", c], strict=True)
            )
            ratio = {n: best["relay"]["rps"] / best[n]["rps"] for n in names}
            print(
                f"c={c}: bare {best['bare']['rps']:.0f}, bare-ll {best['bare-ll']['rps']:.0f}, "
                f"bare-own {best['bare-own']['rps']:.0f}, relay {best['relay']['rps']:.0f} req/s "
                f"(p50 {best['relay']['p50_ms']:.2f} ms, p99 {best['relay']['p99_ms']:.2f} ms); "
                f"ratio to bare {ratio['bare']:.2f} (rounds: {rounds}), to bare-ll "
                f"{ratio['bare-ll']:.2f}, to bare-own {ratio['bare-own']:.2f}"
            )
        # Throughput is what a server sustains at saturation: each at its best concurrency.
        peak = {
            name: max((x for c in conns for x in results[name, c]), key=lambda x: x["rps"])
            for name in names
        }
        per_round = []
        for r in range(args.rounds):
            top = {name: max(results[name, c][r]["rps"] for c in conns) for name in names}
            per_round.append(f"{top['relay'] / top['bare']:.2f}")
        bare, bare_ll, bare_own, relay = (peak[n]["rps"] for n in names)
        print(
            f"throughput (each server's best): bare {bare:.0f}, relay {relay:.0f} req/s: "
            f"ratio {relay / bare:.2f} (rounds: {', '.join(per_round)}); "
            f"to bare-ll {relay / bare_ll:.2f}, to bare-own {relay / bare_own:.2f}"
        )


if __name__ == "__main__":
    main()
