"""The benchmarks' sink: an aiohttp process that answers webhook POSTs and records when
each one first arrived (``bench/e2e.py``, ``bench/drain.py``, ``bench/scheduling.py``).

Every POST to a path other than the control ones is a delivery. The sink answers it with
its current status after its current delay (both 200 / 0 ms at start, changed with
``POST /control?status=503&delay_ms=20``; a reset keeps them). With ``fail_first=1``
it answers the first request of each (path, ``webhook-id``) 503, with a short JSON error
body, and the later ones as usual (``fail_first=0`` ends it). A request it answers 2xx
is recorded as it comes in (before the delay): the first arrival of its ``webhook-id``,
and of its (path, ``webhook-id``) pair — one sink process can stand for many sinks, one
path each.

- ``GET /stats``: ``requests`` (every delivery request), ``ok`` (answered 2xx),
  ``unique`` (distinct ``webhook-id`` answered 2xx), ``deliveries`` (distinct path and
  ``webhook-id`` pairs answered 2xx), ``first`` and ``last`` (the earliest and latest
  first arrival, unix seconds; 0 when none).
- ``GET /dump``: ``webhook-id`` -> first arrival; ``GET /dump?by=path``: path ->
  ``webhook-id`` -> first arrival.
- ``POST /reset``: forget every count and arrival.

    python bench/sinkserver.py PORT [DELAY_MS]
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time


def sink_main(port: int, delay_ms: float = 0.0) -> None:
    from aiohttp import web

    arrivals: dict[str, float] = {}
    by_path: dict[str, dict[str, float]] = {}
    count = [0, 0]  # requests, answered 2xx
    control = {"status": 200, "delay": delay_ms / 1000, "fail_first": 0}
    tried: set[tuple[str, str | None]] = set()  # fail_first: (path, webhook-id) seen

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        count[0] += 1
        status, delay = int(control["status"]), control["delay"]
        if control["fail_first"]:
            key = (request.path, request.headers.get("webhook-id"))
            if key not in tried:
                tried.add(key)
                return web.json_response({"error": "temporarily unavailable"}, status=503)
        if 200 <= status < 300:
            now = time.time()
            count[1] += 1
            event_id = request.headers.get("webhook-id")
            if event_id is not None:
                arrivals.setdefault(event_id, now)
                by_path.setdefault(request.path, {}).setdefault(event_id, now)
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(status=status)

    async def stats(request: web.Request) -> web.Response:
        times = list(arrivals.values())
        return web.json_response(
            {
                "requests": count[0],
                "ok": count[1],
                "unique": len(arrivals),
                "deliveries": sum(len(ids) for ids in by_path.values()),
                "first": min(times, default=0.0),
                "last": max(times, default=0.0),
            }
        )

    async def dump(request: web.Request) -> web.Response:
        if request.query.get("by") == "path":
            return web.json_response(by_path)
        return web.json_response(arrivals)

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        by_path.clear()
        tried.clear()
        count[0] = count[1] = 0
        return web.json_response({})

    async def set_control(request: web.Request) -> web.Response:
        if "status" in request.query:
            control["status"] = int(request.query["status"])
        if "fail_first" in request.query:
            control["fail_first"] = int(request.query["fail_first"])
        if "delay_ms" in request.query:
            control["delay"] = float(request.query["delay_ms"]) / 1000
        return web.json_response(control)

    app = web.Application(client_max_size=1_048_576)
    app.router.add_get("/stats", stats)
    app.router.add_get("/dump", dump)
    app.router.add_post("/reset", reset)
    app.router.add_post("/control", set_control)
    app.router.add_post("/{tail:.*}", hook)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def start_sink(port: int, delay_ms: float = 0.0) -> subprocess.Popen[bytes]:
    """This sink in its own process on ``port`` (the caller waits for the port)."""
    return subprocess.Popen([sys.executable, __file__, str(port), str(delay_ms)])


if __name__ == "__main__":
    sink_main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
