"""Scenarios of processes that stop without dying: a worker, ``serve`` or Redis frozen
(SIGSTOP) for seconds under load and then let go on (SIGCONT) — a VM stun or live
migration, ``docker pause``, a swap storm, a long blocked loop — and ordered sinks
(``ordering = "chat"``) under a worker's pause and under worker kills.

A frozen worker's holds on its running deliveries (~10 s, renewed every 2 s) run out
while it cannot renew them; another worker runs those deliveries again, and the frozen
one, let go, reads the answers waiting in its sockets and finishes them too. What that
may cost is a duplicate, never an event: so every scenario here allows duplicates and
holds lost to 0. The sinks answer a share of requests slowly, so that a pause always
finds deliveries in flight; the scenario checks that it did.

A pause has a length of its own, whatever the size of the run: the load lasts at
least the pauses and a few seconds around them (``n`` events spread over that time).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bench.faults.harness import (
    Chert,
    CountingSink,
    RelayProcess,
    deliveries_by_outcome,
    during,
    envelope,
    pause,
    tcp_ports,
)
from bench.faults.stack import Result, Stack, event_ids

if TYPE_CHECKING:
    from bench.faults.scenarios import Run

LEAD_S = 3.0  # load before the first pause
GAP_S = 2.0  # between two pauses
TAIL_S = 2.0  # load after the last pause
QUIET_S = 5.0  # settled: the queue empty this long with events still missing
CHATS = 100  # chats of the ordered scenarios


class SlowShare:
    """A sink's delay: ``share`` of requests answered ``low``-``high`` s late, the rest
    at once; from ``until`` (monotonic time) on, every request at once."""

    def __init__(self, share: float = 0.3, low: float = 1.0, high: float = 3.0) -> None:
        self.share, self.low, self.high = share, low, high
        self.until = float("inf")

    def __call__(self) -> float:
        if time.monotonic() < self.until and random.random() < self.share:
            return random.uniform(self.low, self.high)
        return 0.0


def timeline(run: Run, busy_s: float) -> tuple[float, float]:
    """The load's length and rate: ``run``'s, stretched to cover ``busy_s`` seconds."""
    load_s = max(run.load_s, busy_s)
    return load_s, run.n / load_s


def chat_of(event_id: str) -> str:
    """The chat of an ordered scenario's event: events go round ``CHATS`` chats."""
    return f"c-{int(event_id.rsplit('-', 1)[1]) % CHATS}"


def in_chat_order(chert: Chert) -> Callable[[str], Awaitable[None]]:
    """A send that sends each chat's events one after the other: an event is sent only
    once the chat's previous one was acked (or given up on), so that each chat's
    events reach the relay in the order of their ids — the ingest order a sink with
    ``ordering = "chat"`` must keep."""
    last: dict[str, asyncio.Future[Any]] = {}

    async def after(previous: asyncio.Future[Any] | None, event_id: str, chat: str) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        await chert.send(event_id, body=envelope(event_id, chat))

    async def send(event_id: str) -> None:
        chat = chat_of(event_id)
        task = asyncio.ensure_future(after(last.get(chat), event_id, chat))
        last[chat] = task
        await task

    return send


def order_breaks(sink: CountingSink) -> int:
    """Places where a chat's events first came to ``sink`` out of ingest order: an
    event that arrived after a later event of its chat."""
    newest: dict[str, int] = {}
    breaks = 0
    for event_id, _rank in sorted(sink.first.items(), key=lambda kv: kv[1]):
        chat, index = chat_of(event_id), int(event_id.rsplit("-", 1)[1])
        if index < newest.get(chat, -1):
            breaks += 1
        newest[chat] = max(index, newest.get(chat, -1))
    return breaks


def check_order(stack: Stack, res: Result) -> None:
    breaks = {s.name: order_breaks(s) for s in stack.sinks}
    res.notes["order_breaks"] = breaks
    for name, n in breaks.items():
        if n:
            res.broken.append(f"sink {name}: {n} event(s) of a chat first arrived out of order")


async def _pauses(
    stack: Stack, proc: RelayProcess, lengths: list[float], res: Result, *, held: bool
) -> None:
    """Pause ``proc`` for each of ``lengths`` in turn (from ``LEAD_S`` into the load);
    with ``held``, note how many sink requests it had in flight at each pause."""
    await asyncio.sleep(LEAD_S)
    caught: list[int] = []
    for i, length in enumerate(lengths):
        if i:
            await asyncio.sleep(GAP_S)
        if held:
            ports = tcp_ports(proc.pid)
            caught.append(sum(s.answering(ports) for s in stack.sinks))
        await pause(proc.pid, length)
    if held:
        res.notes["in_flight_at_pause"] = caught
        if not any(caught):
            res.broken.append("no pause found a delivery in flight on the paused worker")


async def _worker_pause(
    run: Run,
    res: Result,
    tag: str,
    lengths: list[float],
    *,
    timeout: float,
    ordered: bool = False,
) -> None:
    """Two workers on the queue, two sinks (some answers 1-3 s late); the second worker
    paused for each of ``lengths``; ``timeout`` is the sinks' timeout."""
    stack = Stack(run.workdir, sinks=2, workers=2)
    slow = SlowShare()
    for s in stack.sinks:
        s.delay = slow
    busy = LEAD_S + sum(lengths) + GAP_S * (len(lengths) - 1) + TAIL_S
    load_s, rate = timeline(run, busy)
    # With 30 % of answers 1-3 s late, s can take twice the events' rate at once and
    # s2 a fifth of it: s2 works at its cap, as a slow sink does, its deliveries waiting
    # in the queue for a slot while those of s go at once — so an event may still be
    # needed by s2 when a delivery to s ends a second time. (Once the load is over both
    # answer at once, and the backlog drains quickly.)
    caps = {"s": max(8, round(2 * rate)), "s2": max(4, round(rate / 5))}
    sink: dict[str, Any] = {"timeout": timeout}
    if ordered:
        sink["ordering"] = "chat"
    per_sink = {name: {"concurrency": cap} for name, cap in caps.items()}
    try:
        await stack.start(sink=sink, per_sink=per_sink)
        ids = event_ids(tag, run.n)
        send = in_chat_order(stack.chert) if ordered else None
        slow.until = time.monotonic() + load_s
        await asyncio.gather(
            stack.chert.run(ids, rate, send),
            _pauses(stack, stack.workers[1], lengths, res, held=True),
        )
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout, quiet=QUIET_S)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes.update(
            pauses_s=lengths, sink_timeout_s=timeout, concurrency=caps, load_s=round(load_s, 1)
        )
        await _dropped(stack, res)
        if ordered:
            check_order(stack, res)
    finally:
        await stack.close()


async def _dropped(stack: Stack, res: Result) -> None:
    """Deliveries the workers dropped because the stored event was gone (the mark of an
    event released too early), from their metrics."""
    dropped = 0
    for admin in stack.worker_admins:
        dropped += (await deliveries_by_outcome(admin))["missing"]
    res.notes["dropped_event_gone"] = dropped


async def worker_pause_long(run: Run, res: Result) -> None:
    """11. One of two workers paused 15 s (sink timeout 30 s): held deliveries run again
    on the other worker, and the paused one finishes them too when let go."""
    await _worker_pause(run, res, "wp", [15.0], timeout=30.0)


async def worker_pause_default_timeout(run: Run, res: Result) -> None:
    """12. One of two workers paused 9.5 s, then 12 s (the default sink timeout, 10 s):
    pauses about as long as the hold, answers about as late as the timeout."""
    await _worker_pause(run, res, "wq", [9.5, 12.0], timeout=10.0)


async def ordered_worker_pause(run: Run, res: Result) -> None:
    """20. Two ordered sinks (``ordering = "chat"``), one of two workers paused 15 s
    (sink timeout 30 s): nothing lost, each chat's events first arrive in order."""
    await _worker_pause(run, res, "op", [15.0], timeout=30.0, ordered=True)


async def serve_pause(run: Run, res: Result) -> None:
    """13. ``serve`` paused 15 s under load: Chert's attempts time out and are retried."""
    stack = Stack(run.workdir)
    length = 15.0
    load_s, rate = timeline(run, LEAD_S + length + TAIL_S)
    try:
        await stack.start()
        ids = event_ids("sp", run.n)
        await asyncio.gather(
            stack.chert.run(ids, rate),
            _pauses(stack, stack.serve, [length], res, held=False),
        )
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout, quiet=QUIET_S)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes.update(pause_s=length, load_s=round(load_s, 1))
    finally:
        await stack.close()


async def redis_pause(run: Run, res: Result) -> None:
    """14. Redis paused 10 s under load, two sinks (some answers 1-3 s late)."""
    stack = Stack(run.workdir, sinks=2)
    slow = SlowShare()
    for s in stack.sinks:
        s.delay = slow
    length = 10.0
    load_s, rate = timeline(run, LEAD_S + length + TAIL_S)
    try:
        await stack.start(sink={"concurrency": 64})
        ids = event_ids("rp", run.n)
        slow.until = time.monotonic() + load_s

        async def redis_paused() -> None:
            await asyncio.sleep(LEAD_S)
            res.notes["in_flight_at_pause"] = sum(s.active for s in stack.sinks)
            await pause(stack.redis.pid, length)

        await asyncio.gather(stack.chert.run(ids, rate), redis_paused())
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout, quiet=QUIET_S)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes.update(pause_s=length, load_s=round(load_s, 1))
        await _dropped(stack, res)
    finally:
        await stack.close()


async def ordered_worker_kills(run: Run, res: Result) -> None:
    """21. Two ordered sinks (30 % of answers 0.2-1 s late), the worker SIGKILLed every
    3 s under load (at least 12 s of it) and restarted: nothing lost, each chat's
    events first arrive in order."""
    stack = Stack(run.workdir, sinks=2)
    slow = SlowShare(0.3, 0.2, 1.0)
    for s in stack.sinks:
        s.delay = slow
    load_s, rate = timeline(run, 12.0)
    try:
        await stack.start(sink={"ordering": "chat", "concurrency": 64})
        ids = event_ids("ok", run.n)
        caught: list[int] = []

        async def kill() -> None:
            caught.append(sum(s.active for s in stack.sinks))
            await stack.restart_worker()
            res.restarts += 1

        slow.until = time.monotonic() + load_s
        load = stack.chert.run(ids, rate, in_chat_order(stack.chert))
        await during(load, [3.0 * k for k in range(1, int(load_s / 3.0) + 1)], kill)
        settle = await stack.settle(stack.chert.stats.acked, run.settle_timeout, quiet=QUIET_S)
        stack.account(res, stack.chert.stats.acked, settle)
        res.notes.update(load_s=round(load_s, 1), in_flight_at_kill=caught)
        check_order(stack, res)
    finally:
        await stack.close()
