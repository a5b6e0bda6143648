"""Every Redis key the relay reads or writes: its own, and arq's queue and job keys.

The relay's own keys are ``{prefix}:{segment}:…``, with the segments in
:data:`SEGMENTS`; the Lua scripts that build key names themselves (``ingest.lua``) get
the same segments from the script loader (:mod:`relay.store.scripts`), so the two
cannot drift apart. arq's keys use arq's own prefixes, outside the relay's.
"""

from __future__ import annotations

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

# Segment names, by what they hold. Lua sees this table as ``KEY``.
SEGMENTS: dict[str, str] = {
    "seen": "seen",
    "event": "ev",
    "last_webhook": "lastwh",
    "watermark": "poll:wm",
    "poll_lease": "poll:lease",
    "attempts": "att",
    "breaker": "brk",
    "inflight": "inflight",
    "sink_gone": "gone",
    "paused": "paused",
    "rate": "rate",
    "dead_letters": "dl",
    "dead_letter": "dle",
    "dead_letter_counts": "dlc",
    "chat_order": "ord",
    "held_chats": "ordheld",
    "queue": "queue",
    "waiting": "wait",
    "waiting_sinks": "waiting",
    "wake": "wake",
    "event_log": "log",
    "event_log_copy": "logev",
    "event_log_index": "logix",
    "event_log_bytes": "logbytes",
}
JOB_KEY_PREFIX: str = job_key_prefix


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._p = {name: f"{prefix}:{segment}:" for name, segment in SEGMENTS.items()}

    # --- ingest and upstream ---------------------------------------------------------

    def seen(self, tenant: str, event_id: str) -> str:
        """Dedupe marker for one event, with the dedupe TTL."""
        return f"{self._p['seen']}{tenant}:{event_id}"

    def event(self, tenant: str, event_id: str) -> str:
        """The stored event, a string shared by its deliveries (:mod:`relay.store.stored_event`)."""
        return f"{self._p['event']}{tenant}:{event_id}"

    def last_webhook(self, tenant: str) -> str:
        """Unix ms of the tenant's last verified webhook (any relay instance)."""
        return f"{self._p['last_webhook']}{tenant}"

    def watermark(self, tenant: str) -> str:
        """The poller's watermark: unix seconds (float) of the newest ``created_at`` ingested."""
        return f"{self._p['watermark']}{tenant}"

    def poll_lease(self, tenant: str) -> str:
        """Lease naming the one relay instance that polls ``tenant`` (token, with expiry)."""
        return f"{self._p['poll_lease']}{tenant}"

    # --- the queue (arq's format: relay.store.jobs) ------------------------------------

    @property
    def queue(self) -> str:
        """arq's queue: a sorted set of job ids scored by the time they are due (ms)."""
        return f"{self.prefix}:{SEGMENTS['queue']}"

    def job_id(self, tenant: str, sink: str, event_id: str) -> str:
        """Deterministic: the same (event, sink) always maps to the same job."""
        return f"{self.prefix}:{tenant}:{sink}:{event_id}"

    def parse_job_id(self, job_id: str) -> tuple[str, str, str]:
        """``(tenant, sink, event_id)`` of a delivery's job id (:meth:`job_id`): slugs
        have no ``:``, so the event id is the rest (it may have some)."""
        tenant, _, rest = job_id.removeprefix(self.prefix + ":").partition(":")
        sink, _, event_id = rest.partition(":")
        return tenant, sink, event_id

    @staticmethod
    def job(job_id: str) -> str:
        """arq's job record (``relay.store.jobs``), with an expiry past the deadline."""
        return job_key_prefix + job_id

    @staticmethod
    def job_retry(job_id: str) -> str:
        """arq's count of a job's pickups."""
        return retry_key_prefix + job_id

    @staticmethod
    def job_in_progress(job_id: str) -> str:
        """arq's mark that a worker is running the job."""
        return in_progress_key_prefix + job_id

    # --- delivery (relay.delivery) -------------------------------------------------------

    def attempts(self, tenant: str, sink: str, event_id: str) -> str:
        """Hash: one (event, sink) delivery's attempts, deadline, next due time, last error."""
        return f"{self._p['attempts']}{tenant}:{sink}:{event_id}"

    def breaker(self, tenant: str, sink: str) -> str:
        """Hash: a sink's circuit breaker (state, consecutive failures, open until, probe)."""
        return f"{self._p['breaker']}{tenant}:{sink}"

    def inflight(self, tenant: str, sink: str) -> str:
        """Sorted set: job ids delivering to a sink now, scored by lease expiry (ms)."""
        return f"{self._p['inflight']}{tenant}:{sink}"

    def waiting(self, tenant: str, sink: str) -> str:
        """Sorted set: the sink's deliveries set aside until it has a free in-flight slot
        (or its breaker lets one through), by queue order (:file:`lua/lib/wait.lua`)."""
        return f"{self._p['waiting']}{tenant}:{sink}"

    @property
    def waiting_sinks(self) -> str:
        """Set: ``tenant:sink`` of every sink with deliveries set aside."""
        return f"{self.prefix}:{SEGMENTS['waiting_sinks']}"

    @property
    def wake(self) -> str:
        """Pub/sub channel: new work is due in the queue (a hint; workers also poll)."""
        return f"{self.prefix}:{SEGMENTS['wake']}"

    def sink_gone(self, tenant: str, sink: str) -> str:
        """The sink URL that answered 410 Gone (deliveries to it dead-letter at once)."""
        return f"{self._p['sink_gone']}{tenant}:{sink}"

    def rate(self, tenant: str, sink: str) -> str:
        """Hash: a paced sink's ``rate`` state, shared by every worker
        (``lua/lib/rate.lua``): when its next delivery may start, the last turn promised
        to one put off, and until when a Retry-After holds it back (Unix ms, Redis'
        clock)."""
        return f"{self._p['rate']}{tenant}:{sink}"

    def paused(self, tenant: str, sink: str) -> str:
        """Redis' time (Unix ms) an operator paused a sink at; absent while it is not
        paused. While it is there nothing is sent to the sink: its deliveries wait in its
        waiting set without attempts, and their deadlines move back by the pause
        (:mod:`relay.store.sinks`)."""
        return f"{self._p['paused']}{tenant}:{sink}"

    def dead_letters(self, tenant: str) -> str:
        """Sorted set of a tenant's dead letters (``sink:event_id``) by dead-letter time (ms)."""
        return f"{self._p['dead_letters']}{tenant}"

    def dead_letter(self, tenant: str, sink: str, event_id: str) -> str:
        """Hash: one dead letter (class, status, error, attempts, times, type)."""
        return f"{self._p['dead_letter']}{tenant}:{sink}:{event_id}"

    def dead_letter_counts(self, tenant: str) -> str:
        """Hash: the tenant's stored dead letters by class."""
        return f"{self._p['dead_letter_counts']}{tenant}"

    # --- the event log (relay.store.eventlog) -------------------------------------------

    def event_log(self, tenant: str, event_id: str) -> str:
        """Hash: one event's record — its arrivals, and per sink its state and every
        attempt (:file:`lua/lib/event_log.lua`); its type, chat and payload are in the
        stored event, or once that is let go, in :meth:`event_log_copy`."""
        return f"{self._p['event_log']}{tenant}:{event_id}"

    def event_log_copy(self, tenant: str, event_id: str) -> str:
        """String: the record's copy of the stored event, kept (renamed) when its last
        delivery let it go."""
        return f"{self._p['event_log_copy']}{tenant}:{event_id}"

    @property
    def event_log_index(self) -> str:
        """Sorted set: ``tenant:event_id`` of every record, by first arrival (ms)."""
        return f"{self.prefix}:{SEGMENTS['event_log_index']}"

    @property
    def event_log_bytes(self) -> str:
        """The records' size, all told (bytes, as counted by the scripts that write them)."""
        return f"{self.prefix}:{SEGMENTS['event_log_bytes']}"

    # --- ordered delivery (sink.ordering = "chat") ---------------------------------------

    def chat_order(self, tenant: str, sink: str, chat: str) -> str:
        """List: the chat's events for an ordered sink, in ingest order; the head's job
        is in the queue, the others wait (parked) until it is done."""
        return f"{self._p['chat_order']}{tenant}:{sink}:{chat}"

    def held_chats(self, tenant: str, sink: str) -> str:
        """Sorted set: chats a dead letter holds (``on_dead_letter = "hold"``), by when."""
        return f"{self._p['held_chats']}{tenant}:{sink}"
