"""The tracer: the relay's spans, made with OpenTelemetry's SDK and exported over OTLP/HTTP.

The one module that imports OpenTelemetry (:mod:`relay.telemetry` loads it only when
``[telemetry] tracing`` is on). The exporter, sampler and resource are the SDK's,
configured by the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_HEADERS``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``…); ``service.name`` is
``chert-relay`` unless they name another. Spans are queued and exported in batches by
the SDK's thread, off the event loop.

The spans (:data:`ATTRIBUTES` names what an operator filters by):

- ``webhook`` (server): one per webhook whose tenant is known, from its arrival to its
  answer, with an event (``verified``) once its signature is verified and its body
  parsed: the rest is its ingest. The root of its event's trace.
- ``poll window`` (internal): one per window of the poller, with Chert's ``X-Trace-ID``
  of each page read (``chert.trace_id``).
- ``ingest`` (internal): one per event from a poll, the SSE stream or a backfill: the
  root of its event's trace, linked to the poll window that read it.
- ``delivery attempt`` (client; producer for a broker sink): one per attempt, a child of
  its event's root span, read back from the stored event in whichever worker runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from relay import __version__

if TYPE_CHECKING:
    from relay.delivery.sink_client import Answer, Request
    from relay.ingest.envelope import Event

DEFAULT_SERVICE_NAME = "chert-relay"

# The attributes of the relay's spans (beyond OpenTelemetry's http.response.status_code).
ATTRIBUTES = (
    "relay.tenant",  # every span: the tenant's slug
    "relay.event.type",  # webhook, ingest, delivery attempt
    "relay.event.id",  # webhook, ingest, delivery attempt: Chert's event id
    "relay.source",  # ingest, poll window, delivery attempt: webhook, poll, sse, ...
    "relay.full",  # poll window: a full window (from the watermark less the overlap)
    "relay.outcome",  # webhook: accepted, duplicate, rejected, unavailable, error;
    # ingest: new, duplicate, failed; poll window: ok, failed;
    # delivery attempt: delivered, failed (worth another attempt), refused, cancelled,
    # error (a fault of the relay's own)
    "relay.reason",  # webhook refused: the reason label of webhook_rejections_total
    "relay.sink",  # delivery attempt: the sink's name
    "relay.sink.kind",  # delivery attempt: http, redis-stream, nats, amqp
    "relay.attempt",  # delivery attempt: its number, from 1
    "relay.answer",  # delivery attempt: http, timeout, connection, ack, nack, refused
    "chert.trace_id",  # poll window: Chert's X-Trace-ID of each page (a list)
)


def _resource() -> Resource:
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, the SDK's
    name = resource.attributes.get(SERVICE_NAME)
    if not isinstance(name, str) or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _traceparent(ctx: trace.SpanContext) -> str:
    """A span context as a W3C ``traceparent`` (version 00)."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def _tracestate(ctx: trace.SpanContext) -> str:
    """Its ``tracestate``, without the optional white space ("": none)."""
    return "".join(ctx.trace_state.to_header().split()) if ctx.trace_state else ""


def stored_field(span: trace.Span) -> bytes:
    """The span's W3C trace context as the stored event keeps it: ``traceparent``, then
    ``;tracestate`` if there is one (its optional white space dropped: the field holds
    none); empty for a span without a valid context."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return b""
    state = _tracestate(ctx)
    parent = _traceparent(ctx)
    return f"{parent};{state}".encode() if state else parent.encode()


def _parent(field: str) -> otel_context.Context | None:
    """The context a stored trace field names (None: it names none, or not validly)."""
    parent, _, state = field.partition(";")
    parts = parent.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    ctx = trace.SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(flags & 0xFF),
        trace_state=trace.TraceState.from_header([state]) if state else None,
    )
    if not ctx.is_valid:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(ctx))


def exemplar(span: trace.Span) -> dict[str, str] | None:
    """The span's trace id (and id) as a Prometheus exemplar; None if it is not sampled."""
    ctx = span.get_span_context()
    if not ctx.trace_flags.sampled:
        return None
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


class Attempt:
    """One delivery attempt's span, from its headers to its answer."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def end(self, answer: Answer) -> Answer:
        """End the span with how the attempt went; the answer, carrying its exemplar."""
        span = self.span
        if answer.status is not None:
            span.set_attribute("http.response.status_code", answer.status)
        span.set_attribute("relay.answer", answer.kind)
        if answer.ok:
            span.set_attribute("relay.outcome", "delivered")
        else:
            span.set_attribute("relay.outcome", "failed" if answer.retryable else "refused")
            span.set_status(Status(StatusCode.ERROR, answer.error or answer.said))
        span.end()
        return replace(answer, exemplar=exemplar(span))

    def broke(self, error: BaseException) -> None:
        """The attempt ended without an answer: cancelled (the worker stopping), or a
        fault of the relay's own."""
        if isinstance(error, asyncio.CancelledError):
            self.span.set_attribute("relay.outcome", "cancelled")
        else:
            self.span.set_attribute("relay.outcome", "error")
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.end()


class PollWindow:
    """A poll window's span: each page's ``X-Trace-ID`` is added to it."""

    __slots__ = ("span", "trace_ids")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.trace_ids: list[str] = []

    def page(self, trace_id: str | None) -> None:
        if trace_id:
            self.trace_ids.append(trace_id)
            self.span.set_attribute("chert.trace_id", self.trace_ids)


class Tracer:
    """Makes the relay's spans; one per process, while tracing is on."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("chert-relay", __version__)

    @classmethod
    def from_env(cls) -> Tracer:
        """A tracer exporting in batches over OTLP/HTTP, as the ``OTEL_*`` variables say."""
        provider = TracerProvider(resource=_resource())
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    async def shutdown(self) -> None:
        """Export the spans still queued (bounded by the exporter's timeout), then stop."""
        await asyncio.to_thread(self._provider.shutdown)

    @staticmethod
    def exemplar(span: trace.Span) -> dict[str, str] | None:
        return exemplar(span)

    @staticmethod
    def field(span: trace.Span) -> bytes:
        """The span's context as the stored event keeps it (:func:`stored_field`)."""
        return stored_field(span)

    # --- the receiver ----------------------------------------------------------------

    def webhook(self, tenant: str, started: float) -> trace.Span:
        """A webhook's span, from its arrival (``started``: its ``perf_counter()``)."""
        ago_ns = int((time.perf_counter() - started) * 1e9)
        return self._tracer.start_span(
            "webhook",
            context=otel_context.Context(),  # a root: the event's trace starts here
            kind=SpanKind.SERVER,
            attributes={"relay.tenant": tenant, "http.request.method": "POST"},
            start_time=time.time_ns() - ago_ns,
        )

    @staticmethod
    def webhook_event(span: trace.Span, event: Event) -> bytes:
        """The webhook carries ``event``, verified and parsed (a span event, ``verified``:
        the rest of the span is its ingest): note it, and give the trace field to store."""
        span.add_event("verified")
        span.set_attributes({"relay.event.type": event.type, "relay.event.id": event.event_id})
        return stored_field(span)

    @staticmethod
    def webhook_end(span: trace.Span, status: int, outcome: str, reason: str = "") -> None:
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("relay.outcome", outcome)
        if reason:
            span.set_attribute("relay.reason", reason)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    # --- the other sources ------------------------------------------------------------

    def ingest(self, tenant: str, event: Event, source: str) -> trace.Span:
        """The span of an event from a poll, the SSE stream or a backfill: the
        root of its trace, linked to the span current here (a poll window's)."""
        current = trace.get_current_span().get_span_context()
        return self._tracer.start_span(
            "ingest",
            context=otel_context.Context(),
            links=[Link(current)] if current.is_valid else (),
            attributes={
                "relay.tenant": tenant,
                "relay.event.type": event.type,
                "relay.event.id": event.event_id,
                "relay.source": source,
            },
        )

    @contextlib.contextmanager
    def poll_window(self, tenant: str, source: str, full: bool) -> Iterator[PollWindow]:
        """A poll window's span, current while it runs (so its events' spans link to it)."""
        with self._tracer.start_as_current_span(
            "poll window",
            attributes={"relay.tenant": tenant, "relay.source": source, "relay.full": full},
            record_exception=False,
        ) as span:
            window = PollWindow(span)
            try:
                yield window
            except Exception as e:
                window.page(getattr(e, "trace_id", None))  # a refusal's X-Trace-ID
                span.set_attribute("relay.outcome", "failed")
                span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
                raise
            span.set_attribute("relay.outcome", "ok")

    # --- delivery ------------------------------------------------------------------------

    def attempt(self, req: Request, sink: str, kind: str, headers: dict[str, str]) -> Attempt:
        """A delivery attempt's span, a child of its event's (``req.trace``); its context
        goes into ``headers`` as ``traceparent`` (and ``tracestate``)."""
        span = self._tracer.start_span(
            "delivery attempt",
            context=(_parent(req.trace) if req.trace else None) or otel_context.Context(),
            kind=SpanKind.CLIENT if kind == "http" else SpanKind.PRODUCER,
            attributes={
                "relay.tenant": req.tenant,
                "relay.sink": sink,
                "relay.sink.kind": kind,
                "relay.event.type": req.event_type,
                "relay.event.id": req.event_id,
                "relay.attempt": req.attempt,
                "relay.source": req.source,
            },
        )
        ctx = span.get_span_context()
        headers["traceparent"] = _traceparent(ctx)
        state = _tracestate(ctx)
        if state:
            headers["tracestate"] = state
        return Attempt(span)
