"""The listener: reads one tenant's events from Chert and forwards them to one local URL."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import aiohttp

from relay.config import TenantConfig
from relay.delivery.retry import backoff
from relay.delivery.sink_client import Answer, Request, SinkClient
from relay.errors import EXIT_CONFIG, ChertApiError, RelayError, UpstreamError
from relay.ingest.envelope import BadEventError, Event, from_object, parse_timestamp
from relay.listen.state import OVERLAP_S, ListenState
from relay.upstream.chert_api import ChertApi, isoformat
from relay.upstream.sse import read_messages

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0  # while the stream is unavailable
SSE_RETRY_S = 30.0  # how long to poll before trying the stream again
SSE_IDLE_S = 30.0  # a stream silent this long (not even a heartbeat) is dead
SSE_SHORT_S = 5.0  # a stream that ends sooner, having sent nothing, counts as failed
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0
QUEUE_SIZE = 1000


class ListenAuthError(RelayError):
    """Chert refused the credentials (or the tenant): no retry can fix that."""

    exit_code = EXIT_CONFIG


# --- the listener ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Incoming:
    event: Event
    created: float  # the row's created_at (else the event's time, else when it came)
    source: str  # "sse" or "poll"


class Listener:
    """Reads one tenant's events from Chert and forwards them to one local URL."""

    def __init__(
        self,
        tenant: TenantConfig,
        state: ListenState,
        *,
        out: TextIO | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        retry_backoff: float = RETRY_BACKOFF_S,
        poll_interval: float = POLL_INTERVAL_S,
        sse_retry: float = SSE_RETRY_S,
    ) -> None:
        self.tenant = tenant
        self.sink = tenant.sinks[0]
        self.state = state
        self.out = out if out is not None else sys.stdout
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.poll_interval = poll_interval
        self.sse_retry = sse_retry
        self.mode = "starting"  # "sse" or "poll"
        self.delivered = 0  # events the local app took (2xx), this run
        self.failed = 0  # events given up on, this run
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(QUEUE_SIZE)
        self._queued: dict[str, float] = {}  # ids read this run -> created (pruned)
        self._newest = state.watermark if state.watermark is not None else time.time()

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def run(self) -> None:
        async with aiohttp.ClientSession(headers={"User-Agent": "chert-relay listen"}) as session:
            api = ChertApi(self.tenant, session)
            client = SinkClient(session)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(api), name="listen:read")
                tg.create_task(self._forward(client), name="listen:forward")

    # --- reading ---------------------------------------------------------------------

    def _since(self) -> str:
        return isoformat(min(self._newest, time.time()) - OVERLAP_S)

    async def _take(self, row: object, source: str) -> None:
        if not isinstance(row, dict):
            return
        try:
            event = from_object(row)
        except BadEventError as e:
            log.warning("skipping an event Chert sent: %s", e)
            return
        if event.partner_id is not None and event.partner_id != self.tenant.slug:
            log.warning("skipping event %s: it names partner %r", event.event_id, event.partner_id)
            return
        created = parse_timestamp(row.get("created_at"))
        if created is None:
            created = event.timestamp if event.timestamp is not None else time.time()
        created = min(created, time.time() + 300.0)  # a date far ahead cannot carry the cursor
        self._newest = max(self._newest, created)
        if self.state.started is not None and created < self.state.started:
            return  # the re-read overlap of the first run: from before it started
        if event.event_id in self._queued or event.event_id in self.state.forwarded:
            return
        self._queued[event.event_id] = created
        if len(self._queued) > 2 * QUEUE_SIZE:  # what a re-read could still bring back
            floor = self._newest - 2 * OVERLAP_S
            self._queued = {k: v for k, v in self._queued.items() if v >= floor}
        await self._queue.put(Incoming(event, created, source))

    async def _read(self, api: ChertApi) -> None:
        while True:
            try:
                if await self._stream(api):
                    continue  # `event: close` or end of stream: reconnect, signed afresh
                why = f"it ended within {SSE_SHORT_S:g}s having sent nothing"
            except ChertApiError as e:
                if e.is_auth:
                    raise ListenAuthError(f"Chert refused the API credentials: {e}") from None
                why = str(e)
            except (UpstreamError, aiohttp.ClientError, OSError) as e:
                why = str(e) or type(e).__name__
            if self.mode != "poll":
                log.warning("the event stream is unavailable (%s); polling the events API", why)
            self.mode = "poll"
            await self._poll_for(api, self.sse_retry)

    async def _stream(self, api: ChertApi) -> bool:
        """Read one connection to its end; False if it ended at once having sent nothing
        (a server that closes every stream must not make a reconnect loop)."""
        started = time.monotonic()
        lines = 0
        async with api.stream(since=self._since()) as resp:
            if self.mode != "sse":
                log.info("tailing Chert's event stream")
            self.mode = "sse"
            async for msg in read_messages(resp.content, idle_timeout=SSE_IDLE_S):
                lines += 1
                if msg.event == "close":
                    break
                try:
                    row = json.loads(msg.data)
                except ValueError:
                    log.warning("skipping a stream message that is not JSON")
                    continue
                await self._take(row, "sse")
        return lines > 0 or time.monotonic() - started >= SSE_SHORT_S

    async def _poll_for(self, api: ChertApi, seconds: float) -> None:
        """Poll ``GET /events`` every ``poll_interval`` for ``seconds``."""
        until = time.monotonic() + seconds
        while True:
            try:
                rows: list[dict[str, Any]] = []
                async for page in api.events(since=self._since(), page_size=200):
                    rows += page.rows
                # Chert pages newest first: forward oldest first.
                rows.sort(key=lambda r: parse_timestamp(r.get("created_at")) or 0.0)
                for row in rows:
                    await self._take(row, "poll")
            except ChertApiError as e:
                if e.is_auth:
                    raise ListenAuthError(f"Chert refused the API credentials: {e}") from None
                log.warning("polling the events API failed: %s", e)
            except UpstreamError as e:
                log.warning("polling the events API failed: %s", e)
            if time.monotonic() >= until:
                return
            await asyncio.sleep(self.poll_interval)

    # --- forwarding --------------------------------------------------------------------

    async def _forward(self, client: SinkClient) -> None:
        while True:
            item = await self._queue.get()
            if self.sink.matches(item.event.type):
                answer = await self._deliver(client, item)
                if answer.ok:
                    self.delivered += 1
                else:
                    self.failed += 1
            self.state.handled(item.event.event_id, item.created)

    async def _deliver(self, client: SinkClient, item: Incoming) -> Answer:
        event = item.event
        attempt = 1
        while True:
            req = Request(self.tenant.slug, event.event_id, event.type, attempt, item.source)
            headers = client.headers(self.sink, req, event.body)
            answer = await client.post(self.sink, event.body, headers, self.sink.timeout)
            then = ""
            done = answer.ok or not answer.retryable or attempt >= self.max_attempts
            delay = 0.0
            if not done:
                delay = backoff(
                    attempt, self.retry_backoff, RETRY_BACKOFF_MAX_S, answer.retry_after
                )
                then = f"  retrying in {delay:.1f}s"
            elif not answer.ok:
                then = f"  gave up after {attempt} attempt(s)"
            self._print(self._line(event, answer, attempt) + then)
            if done:
                return answer
            await asyncio.sleep(delay)
            attempt += 1

    def _line(self, event: Event, answer: Answer, attempt: int) -> str:
        now = datetime.now(UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        got = str(answer.status) if answer.status is not None else f"no answer ({answer.kind})"
        ms = round(answer.seconds * 1000)
        tail = f" [attempt {attempt}]" if attempt > 1 else ""
        error = f"  ({answer.error})" if answer.status is None else ""
        return f"{now}  {event.type}  {event.event_id}  -> {got} in {ms} ms{tail}{error}"
