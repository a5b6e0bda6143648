"""Traces (``[telemetry] tracing``): the relay as real processes exporting to a real
OTLP/HTTP endpoint the test runs; what arrives is decoded and its spans' parentage checked,
and the sinks check that the ``traceparent`` they get continues the event's trace."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from relay.config import parse_config
from relay.errors import ConfigError
from relay.store.embedded import free_port
from tests.support.common import (
    OTHER_SECRET,
    TENANT,
    WEBHOOK_SECRET,
    config_dict,
    envelope,
    signed,
    wait_for,
)
from tests.support.delivery import FAST_WORKER, Received, Sink, sink_conf, sinks
from tests.support.otlp import Span, collector
from tests.support.process import RelayProcess, write_toml
from tests.support.upstream import API_SECRET, poll_section, simulator

SERVER, CLIENT, PRODUCER = 2, 3, 4  # the proto's SpanKind values


def _config(
    redis_url: str, port: int, admin: int, sink_list: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    tenant = {
        "slug": TENANT,
        "webhook_secrets": [WEBHOOK_SECRET],
        "poll": {"mode": "off"},
        "sinks": sink_list,
        **extra.pop("tenant", {}),
    }
    return config_dict(
        redis_url=redis_url,
        tenants=[tenant],
        server={"listen": f"127.0.0.1:{port}"},
        admin={"listen": f"127.0.0.1:{admin}"},
        worker=FAST_WORKER,
        **extra,
    )


async def _post(port: int, event_id: str, etype: str = "message.received") -> None:
    body, headers = signed(envelope(event_id, etype))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}", data=body, headers=headers
        ) as r,
    ):
        assert r.status == 202, await r.text()


def _traceparent(value: str) -> tuple[str, str, str, bool]:
    """A ``traceparent``'s version, trace id, parent id, and whether it is sampled."""
    version, trace_id, parent, flags = value.split("-")
    return version, trace_id, parent, bool(int(flags, 16) & 1)


def _fails_first(sink: Sink, got: Received) -> tuple[int, dict[str, str]]:
    """503 to the first attempt of ``t-retry``, 200 to everything else."""
    return (503, {}) if got.event_id == "t-retry" and got.attempt == 1 else (200, {})


async def _stop(relay: RelayProcess) -> None:
    relay.signal(signal.SIGTERM)
    assert await relay.wait(20) == 0, relay.log


async def test_a_webhook_and_its_delivery_attempts_make_one_trace(
    redis_url: str, redis: Redis, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    stream = "traced-events"
    async with collector() as otlp, sinks(Sink(_fails_first)) as (sink,):
        sink_list = [
            sink_conf("hook", sink.url),
            {"name": "stream", "url": redis_url, "kind": "redis-stream", "stream": stream},
        ]
        data = _config(redis_url, port, admin, sink_list, telemetry={"tracing": True})
        relay = RelayProcess(write_toml(tmp_path / "relay.toml", data), "run", env=otlp.env())
        try:
            relay.start()
            await relay.wait_ready(f"http://127.0.0.1:{admin}", 20)
            await _post(port, "t-ok")
            await _post(port, "t-retry", "reaction.added")
            body, headers = signed(envelope("t-bad"), OTHER_SECRET)
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{port}/webhooks/chert/{TENANT}", data=body, headers=headers
                ) as r,
            ):
                assert r.status == 401

            def attempts(event_id: str) -> list[Span]:
                return otlp.named("delivery attempt", **{"relay.event.id": event_id})

            await wait_for(lambda: len(sink.for_event("t-retry")) == 2, 20)
            await wait_for(lambda: len(attempts("t-ok")) == 2 and len(attempts("t-retry")) == 3, 20)
            await wait_for(lambda: len(otlp.named("webhook")) == 3, 20)
            kind, exposition = await _scrape_openmetrics(admin)
            assert kind.startswith("application/openmetrics-text")
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{admin}/metrics") as r,
            ):
                assert r.headers["Content-Type"].startswith("text/plain")
                classic = await r.text()
            await _stop(relay)
        finally:
            relay.kill()
    for event_id, etype in (("t-ok", "message.received"), ("t-retry", "reaction.added")):
        (hook,) = otlp.named("webhook", **{"relay.event.id": event_id})
        assert hook.service == "chert-relay"
        assert hook.kind == SERVER
        assert hook.parent_span_id == ""  # the event's trace starts with its webhook
        assert hook.attributes["relay.tenant"] == TENANT
        assert hook.attributes["relay.event.type"] == etype
        assert hook.attributes["relay.outcome"] == "accepted"
        assert hook.attributes["http.response.status_code"] == 202
        assert hook.events == ["verified"]
        tried = attempts(event_id)
        for span in tried:  # every attempt, to every sink: a child of the webhook's span
            assert (span.trace_id, span.parent_span_id) == (hook.trace_id, hook.span_id)
            assert span.attributes["relay.tenant"] == TENANT
            assert span.attributes["relay.event.type"] == etype
            assert span.attributes["relay.source"] == "webhook"
        http_tried = sorted(
            (s for s in tried if s.attributes["relay.sink"] == "hook"),
            key=lambda s: s.attributes["relay.attempt"],
        )
        # what the sink got continues the trace: its parent is that attempt's span
        got = sorted(sink.for_event(event_id), key=lambda g: g.attempt)
        assert len(got) == len(http_tried)
        for span, received in zip(http_tried, got, strict=True):
            assert span.kind == CLIENT
            assert span.attributes["relay.sink.kind"] == "http"
            assert span.attributes["relay.attempt"] == received.attempt
            assert _traceparent(received.headers["traceparent"]) == (
                "00",
                hook.trace_id,
                span.span_id,
                True,
            )
        (streamed,) = [s for s in tried if s.attributes["relay.sink"] == "stream"]
        assert streamed.kind == PRODUCER
        assert streamed.attributes["relay.outcome"] == "delivered"
        assert streamed.attributes["relay.answer"] == "ack"
    (refused,) = otlp.named("webhook", **{"relay.outcome": "rejected"})
    assert refused.attributes["relay.reason"] == "bad_signature"
    assert refused.attributes["http.response.status_code"] == 401
    assert refused.attributes["relay.tenant"] == TENANT
    assert refused.events == []
    assert "relay.event.id" not in refused.attributes
    assert not [s for s in otlp.spans if s.trace_id == refused.trace_id and s != refused]
    retried = sorted(
        (s for s in attempts("t-retry") if s.attributes["relay.sink"] == "hook"),
        key=lambda s: s.attributes["relay.attempt"],
    )
    assert [s.attributes["relay.attempt"] for s in retried] == [1, 2]
    assert [s.attributes["http.response.status_code"] for s in retried] == [503, 200]
    assert [s.attributes["relay.outcome"] for s in retried] == ["failed", "delivered"]
    # the broker message carries the attempt's context too
    entries = await redis.xrange(stream)
    by_event = {fields[b"webhook-id"].decode(): fields for _, fields in entries}
    for event_id in ("t-ok", "t-retry"):
        (span,) = [s for s in attempts(event_id) if s.attributes["relay.sink"] == "stream"]
        parent = by_event[event_id][b"traceparent"].decode()
        assert _traceparent(parent) == ("00", span.trace_id, span.span_id, True)
    # the latency histograms carry trace ids as exemplars, in OpenMetrics only
    trace_ids = {s.trace_id for s in otlp.spans}
    exemplars = [
        line.split('trace_id="')[1][:32]
        for line in exposition.splitlines()
        if line.startswith(("chert_relay_webhook_ack_seconds_bucket", "chert_relay_delivery_"))
        and "# {" in line
    ]
    assert exemplars, exposition
    assert set(exemplars) <= trace_ids
    assert any(
        line.startswith("chert_relay_delivery_attempt_seconds_bucket") and "# {" in line
        for line in exposition.splitlines()
    )
    assert "trace_id" not in classic


async def test_a_polled_event_has_its_own_trace_linked_to_the_poll_window(
    redis_url: str, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    async with collector() as otlp, sinks(Sink()) as (sink,), simulator() as sim:
        api = {"base_url": sim.base_url, "signing_secret": API_SECRET, "max_backoff": 1.0}
        tenant = {"api": api, "poll": poll_section("always", interval=0.2)}
        data = _config(
            redis_url,
            port,
            admin,
            [sink_conf("hook", sink.url)],
            tenant=tenant,
            telemetry={"tracing": True},
        )
        relay = RelayProcess(write_toml(tmp_path / "relay.toml", data), "run", env=otlp.env())
        try:
            relay.start()
            await relay.wait_ready(f"http://127.0.0.1:{admin}", 20)
            rows = sim.emit(TENANT, count=3)
            ids = {r["event_id"] for r in rows}
            await wait_for(lambda: set(sink.ids()) >= ids, 20)
            await wait_for(
                lambda: (
                    {s.attributes["relay.event.id"] for s in otlp.named("ingest")} >= ids
                    and len(otlp.named("delivery attempt")) >= 3
                ),
                20,
            )
            await _stop(relay)
        finally:
            relay.kill()
    windows = {s.span_id: s for s in otlp.named("poll window", **{"relay.tenant": TENANT})}
    assert windows
    for window in windows.values():  # each window carries Chert's X-Trace-ID of its pages
        assert window.attributes["relay.outcome"] == "ok"
        chert = window.attributes["chert.trace_id"]
        assert chert
        assert all(len(t) == 32 and int(t, 16) >= 0 for t in chert)
    for event_id in ids:
        (ingest,) = otlp.named("ingest", **{"relay.event.id": event_id})
        assert ingest.parent_span_id == ""  # one trace per event…
        assert ingest.attributes["relay.source"] == "poll"
        assert ingest.attributes["relay.outcome"] == "new"
        ((link_trace, link_span),) = ingest.links  # …linked to the window that read it
        assert windows[link_span].trace_id == link_trace
        (attempt,) = otlp.named("delivery attempt", **{"relay.event.id": event_id})
        assert (attempt.trace_id, attempt.parent_span_id) == (ingest.trace_id, ingest.span_id)
        (got,) = sink.for_event(event_id)
        assert _traceparent(got.headers["traceparent"]) == (
            "00",
            ingest.trace_id,
            attempt.span_id,
            True,
        )


async def test_with_tracing_off_nothing_is_exported_and_no_traceparent_is_sent(
    redis_url: str, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    async with collector() as otlp, sinks(Sink()) as (sink,):
        data = _config(redis_url, port, admin, [sink_conf("hook", sink.url)])
        relay = RelayProcess(write_toml(tmp_path / "relay.toml", data), "run", env=otlp.env())
        try:
            relay.start()
            await relay.wait_ready(f"http://127.0.0.1:{admin}", 20)
            await _post(port, "off-1")
            await wait_for(lambda: sink.ids() == ["off-1"], 20)
            # the exposition is the classic one, whatever the scraper asks for
            kind, exposition = await _scrape_openmetrics(admin)
            assert kind.startswith("text/plain")
            assert "# {" not in exposition
            await _stop(relay)  # a tracer would export what it still held here
        finally:
            relay.kill()
    (got,) = sink.received
    assert "traceparent" not in got.headers
    assert "tracestate" not in got.headers
    assert otlp.requests == 0


def test_tracing_without_the_otel_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a),
    )
    data = config_dict(telemetry={"tracing": True})
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert "telemetry.tracing" in str(e.value)
    assert "pip install 'chert-relay[otel]'" in str(e.value)


def test_tracing_is_off_by_default_and_takes_a_boolean() -> None:
    assert parse_config(config_dict(), env={}).telemetry.tracing is False
    with pytest.raises(ConfigError) as e:
        parse_config(config_dict(telemetry={"tracing": "sometimes"}), env={})
    assert "telemetry.tracing" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(config_dict(telemetry={"sampling": 0.5}), env={})
    assert "telemetry.sampling" in str(e.value)


def test_a_stored_event_keeps_its_trace_context() -> None:
    from relay.store import stored_event

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    raw = stored_event.header(1, 5, b"webhook", b"-", 3, f"{parent};k=v".encode()) + b"a.bxyz"
    got = stored_event.parse(raw)
    assert (got.type, got.body, got.trace) == ("a.b", b"xyz", f"{parent};k=v")
    plain = stored_event.parse(stored_event.pack(1, 5, "poll", None, "a.b", b"{}"))
    assert plain.trace == ""
    assert json.loads(plain.body) == {}


async def test_a_backfilled_event_has_its_own_trace(redis_url: str, tmp_path: Path) -> None:
    async with collector() as otlp, simulator() as sim:
        rows = sim.emit(TENANT, count=3)
        api = {"base_url": sim.base_url, "signing_secret": API_SECRET, "max_backoff": 1.0}
        data = _config(
            redis_url,
            free_port(),
            free_port(),
            [sink_conf("hook", "http://127.0.0.1:9/hook")],
            tenant={"api": api},
            telemetry={"tracing": True},
        )
        path = write_toml(tmp_path / "relay.toml", data)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "relay", "-c", str(path), "backfill", "--tenant", TENANT,
             "--since", "2000-01-01T00:00:00Z"],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, **otlp.env()},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    # the exit exported every span: no waiting
    spans = otlp.named("ingest", **{"relay.source": "backfill"})
    assert sorted(s.attributes["relay.event.id"] for s in spans) == sorted(
        r["event_id"] for r in rows
    )
    for span in spans:
        assert span.parent_span_id == ""
        assert span.links == []
        assert span.attributes["relay.outcome"] == "new"
        assert span.service == "chert-relay"
    assert len({s.trace_id for s in spans}) == len(spans)  # one trace per event


def test_an_attempt_continues_the_stored_context_tracestate_included() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relay.delivery.sink_client import Answer, Request
    from relay.telemetry.otel import Tracer

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = Tracer(provider)
    trace_id, span_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    stored = f"00-{trace_id}-{span_id}-01;vendor=abc,other=x"
    headers: dict[str, str] = {}
    attempt = tracer.attempt(Request(TENANT, "e1", "t", 2, "replay", stored), "s", "nats", headers)
    answer = attempt.end(Answer(None, "ack", "", None, 0.01, verdict="ok"))
    (span,) = spans.get_finished_spans()
    ctx = span.get_span_context()
    assert span.parent is not None
    assert (f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}") == (trace_id, span_id)
    assert headers["traceparent"] == f"00-{trace_id}-{ctx.span_id:016x}-01"
    assert headers["tracestate"] == "vendor=abc,other=x"
    assert answer.exemplar == {"trace_id": trace_id, "span_id": f"{ctx.span_id:016x}"}
    assert span.attributes is not None
    assert span.attributes["relay.source"] == "replay"
    # a field that names no valid context: the attempt starts a trace of its own
    for bad in ("", "garbage", f"00-{'0' * 32}-{span_id}-01", f"01-{trace_id}-{span_id}"):
        spans.clear()
        headers = {}
        tracer.attempt(Request(TENANT, "e1", "t", 1, "webhook", bad), "s", "http", headers).end(
            Answer(503, "http", "HTTP 503", None, 0.01)
        )
        (span,) = spans.get_finished_spans()
        assert span.parent is None
        assert span.status.status_code.name == "ERROR"
        assert "tracestate" not in headers
    provider.shutdown()


async def _scrape_openmetrics(admin: int) -> tuple[str, str]:
    """/metrics asked for in OpenMetrics: the Content-Type answered, and the text."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{admin}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as r,
    ):
        return r.headers["Content-Type"], await r.text()
