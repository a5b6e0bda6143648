"""CPU per request of the receiver's HTTP server alone, in one process.

Webhook-sized requests (a 1,132-byte body) are fed to one connection through
``data_received`` on a stand-in transport and answered by ``bench/bare.py``'s handler
(every request 202): no sockets, no load generator, no Redis. What it prints is the
process CPU time per request, which a busy machine disturbs far less than it does
requests/s — so two trees can be compared on a shared machine by alternating them:

    python bench/edge_cpu.py [--tree DIR] [--requests 100000] [--pipeline 1]

``--tree`` is the checkout whose ``relay`` and ``bench/bare.py`` are measured (a
``git worktree`` of the code before a change, say); ``--pipeline N`` feeds N
requests per read; ``--pending`` has the handler answer through a future resolved on
the next turn of the loop, as the receiver answers once its ingest is done (one request
per read). Prints microseconds of CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

BODY = (
    b'{"event":"message.received","event_id":"chert:msg:1","partner_id":"acme-7a3f",'
    b'"data":{"text":"' + b"y" * 1035 + b'"}}'
)
REQUEST = (
    b"POST /webhooks/chert/acme-7a3f HTTP/1.1\r\nHost: relay\r\n"
    b"Content-Type: application/json\r\nX-Webhook-Signature: t=1,v1=" + b"a" * 64 + b"\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
)


class _Transport(asyncio.Transport):
    """Takes what is written, counts it, and drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def measure(tree: Path, requests: int, pipeline: int, pending: bool) -> float:
    sys.path[:0] = [str(tree), str(tree / "bench")]
    from bare import _ACCEPTED, _Bare  # the tree's own bench/bare.py

    try:
        from relay.edge.http_server import HttpServer
    except ImportError:  # a tree from before the edge moved out of relay/ingest/
        from relay.ingest.http_server import HttpServer

    class _Pending(_Bare):
        def handle(self, ctx: Any, msg: Any, body: bytes) -> Any:
            future = asyncio.get_running_loop().create_future()
            future.get_loop().call_soon(future.set_result, True)
            return future, lambda f: _ACCEPTED

    server = HttpServer(_Pending() if pending else _Bare(), max_body=2**20, body_timeout=30.0)
    conn = server._connection()
    transport = _Transport()
    conn.connection_made(transport)
    if pending:
        pipeline = 1
    chunk = REQUEST * pipeline
    rounds = max(1, requests // pipeline)

    async def feed(times: int) -> None:
        for _ in range(times):
            conn.data_received(chunk)
            if pending:  # the future resolves, then its answer is written
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    await feed(max(1, 2000 // pipeline))  # warm up
    transport.written = 0
    start = time.process_time()
    await feed(rounds)
    spent = time.process_time() - start
    assert transport.written >= len(b"HTTP/1.1 202") * rounds, "not every request was answered"
    return spent / (rounds * pipeline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--pending", action="store_true")
    args = ap.parse_args()
    per_request = asyncio.run(
        measure(args.tree.resolve(), args.requests, args.pipeline, args.pending)
    )
    print(f"{per_request * 1e6:.2f}")


if __name__ == "__main__":
    main()
