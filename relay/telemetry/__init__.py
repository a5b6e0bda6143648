"""Traces over OpenTelemetry: optional, off by default, and free when off.

``[telemetry] tracing = true`` (with the ``otel`` extra installed) makes each process
start a tracer (:func:`start`), which exports its spans over OTLP/HTTP as the standard
``OTEL_*`` variables say; :mod:`relay.telemetry.otel` is the one module that imports
OpenTelemetry. With tracing off, :data:`TRACER` stays ``None``, nothing of
OpenTelemetry is loaded, and each hook on a hot path (the receiver, the ingestor, the
poller's windows, a delivery's attempt, the broker and HTTP headers) is one
``if TRACER is None`` test.

One trace per event, across the queue: the webhook's span (or, for an event from a poll,
the SSE stream or a backfill, its ingest span, linked to the poll window's span) is
the root; its W3C trace context is stored with the event (:mod:`relay.store.stored_event`),
and each delivery attempt, run later in a worker, is a child of it. The attempt's own
context goes to the sink as ``traceparent`` (and ``tracestate``) — an HTTP header, or a
broker message's header — so the sink's tracing continues the trace.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.telemetry.otel import Tracer

# The process's tracer while tracing is on (between start() and its shutdown); None: off.
TRACER: Tracer | None = None

# The modules the otel extra brings that the tracer needs.
_NEEDED = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


class Window(Protocol):
    """A poll window's span, as the poller sees it."""

    def page(self, trace_id: str | None) -> None:
        """A page was read; ``trace_id``: Chert's ``X-Trace-ID`` for it."""


class _NoWindow:
    def page(self, trace_id: str | None) -> None:
        pass


NO_WINDOW: Window = _NoWindow()  # a poll window's, with tracing off


def missing_extra() -> bool:
    """Whether the ``otel`` extra (the SDK and its OTLP/HTTP exporter) is not installed."""
    try:
        return any(importlib.util.find_spec(name) is None for name in _NEEDED)
    except ModuleNotFoundError:  # a parent package missing
        return True


def start() -> Callable[[], Awaitable[None]]:
    """Start this process's tracer (configured by the ``OTEL_*`` variables); returns the
    coroutine function that flushes the spans still queued and stops it."""
    global TRACER
    from relay.telemetry.otel import Tracer

    tracer = TRACER = Tracer.from_env()

    async def stop() -> None:
        global TRACER
        if TRACER is tracer:
            TRACER = None
        await tracer.shutdown()

    return stop
