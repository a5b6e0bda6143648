"""The Chert API client against the simulator: auth, paging, errors, retries, pauses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay.config import TenantConfig, parse_config
from relay.errors import ChertApiError, ChertUnreachableError
from relay.simulator import Simulator
from relay.store.embedded import free_port
from relay.upstream.chert_api import ChertApi, ChertPagingError, Page, parse_error
from tests.support.common import TENANT, config_dict, log_row
from tests.support.upstream import (
    API_SECRET,
    SINKS,
    paged_chert,
    silent_server,
    simulator,
)


def tenant_config(base_url: str, **api: Any) -> TenantConfig:
    section: dict[str, Any] = {
        "base_url": base_url,
        "signing_secret": API_SECRET,
        "max_backoff": 0.2,
        **api,
    }
    tenants = [{"slug": TENANT, "sinks": SINKS, "api": section, "poll": {"mode": "always"}}]
    config = parse_config(config_dict(tenants=tenants), env={})
    tenant = config.tenant(TENANT)
    assert tenant is not None
    return tenant


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with simulator() as s:
        yield s


@contextlib.asynccontextmanager
async def client(tenant: TenantConfig) -> AsyncIterator[ChertApi]:
    async with aiohttp.ClientSession() as session:
        yield ChertApi(tenant, session)


@pytest.mark.parametrize("auth", ["hmac", "bearer"])
async def test_lists_every_row_across_pages(sim: Simulator, auth: str) -> None:
    rows = sim.emit(TENANT, count=5)
    async with client(tenant_config(sim.base_url, auth=auth)) as api:
        pages = [page async for page in api.events(since=None, page_size=2)]
    assert [len(p.rows) for p in pages] == [2, 2, 1]
    assert sorted(r["event_id"] for p in pages for r in p.rows) == sorted(
        r["event_id"] for r in rows
    )
    assert all(r.status == 200 and r.tenant == TENANT for r in sim.api_requests)


async def test_since_is_sent_and_respected(sim: Simulator) -> None:
    first = sim.emit(TENANT, count=2)
    later = sim.emit(TENANT, count=2)
    async with client(tenant_config(sim.base_url)) as api:
        page = await api.events_page(since=first[-1]["created_at"], limit=50)
    assert {r["event_id"] for r in page.rows} == {r["event_id"] for r in later}


async def test_429_retry_after_is_obeyed_before_any_new_request(sim: Simulator) -> None:
    sim.emit(TENANT, count=1)
    sim.faults.api_429 = 1
    sim.faults.api_retry_after = 0.6
    async with client(tenant_config(sim.base_url)) as api:
        page = await api.events_page(limit=10)
    assert len(page.rows) == 1
    first, second = sim.api_requests
    assert (first.status, first.code) == (429, 1007)
    assert second.status == 200
    assert second.time - first.time >= 0.6


async def test_pause_applies_to_the_next_call_even_after_giving_up(sim: Simulator) -> None:
    sim.faults.api_429 = 5
    sim.faults.api_retry_after = 0.4
    async with client(tenant_config(sim.base_url, max_attempts=1)) as api:
        with pytest.raises(ChertApiError) as info:
            await api.events_page()
        assert info.value.retry_after == pytest.approx(0.4)
        assert api.pause_remaining() > 0
        with pytest.raises(ChertApiError):
            await api.events_page()
    first, second = sim.api_requests
    assert second.time - first.time >= 0.4


async def test_500_is_retried_with_backoff(sim: Simulator) -> None:
    sim.emit(TENANT, count=1)
    sim.faults.api_500 = 2
    async with client(tenant_config(sim.base_url)) as api:
        page = await api.events_page()
    assert len(page.rows) == 1
    assert [r.status for r in sim.api_requests] == [500, 500, 200]


async def test_500_gives_up_after_max_attempts(sim: Simulator) -> None:
    sim.faults.api_500 = 10
    async with client(tenant_config(sim.base_url, max_attempts=3)) as api:
        with pytest.raises(ChertApiError) as info:
            await api.events_page()
    assert info.value.code == 3001
    assert info.value.retryable
    assert len(sim.api_requests) == 3


@pytest.mark.parametrize("auth", ["hmac", "bearer"])
async def test_auth_failure_is_not_retried_and_carries_code_and_trace(
    sim: Simulator, auth: str
) -> None:
    wrong = "0" * 32
    async with client(tenant_config(sim.base_url, auth=auth, signing_secret=wrong)) as api:
        with pytest.raises(ChertApiError) as info:
            await api.events_page()
    err = info.value
    assert (err.status, err.code, err.is_auth, err.retryable) == (401, 2004, True, False)
    assert err.trace_id
    assert len(err.trace_id) == 32
    assert wrong not in str(err)
    assert len(sim.api_requests) == 1


async def test_rotated_file_secret_is_reread_after_a_401(sim: Simulator, tmp_path: Path) -> None:
    secret_file = tmp_path / "api-secret"
    secret_file.write_text("f" * 32)
    tenant = tenant_config(sim.base_url, signing_secret=f"file:{secret_file}")
    sim.emit(TENANT, count=1)
    async with client(tenant) as api:
        with pytest.raises(ChertApiError):
            await api.events_page()  # the old secret; the file did not change
        secret_file.write_text(API_SECRET + "\n")  # rotated on disk
        page = await api.events_page()
    assert len(page.rows) == 1
    assert [r.status for r in sim.api_requests] == [401, 401, 200]


async def test_unreachable_chert_is_retried_then_reported() -> None:
    tenant = tenant_config(f"http://127.0.0.1:{free_port()}/api/v1", max_attempts=2)
    async with client(tenant) as api:
        with pytest.raises(ChertUnreachableError):
            await api.events_page()


def test_parse_error_reads_the_envelope() -> None:
    body = (
        b'{"success":false,"error":{"status":503,"code":4002,"message":"saturated",'
        b'"retryable":true,"retry_after":7},"trace_id":"abc"}'
    )
    err = parse_error(503, CIMultiDict({"X-Trace-ID": "hdr"}), body)
    assert (err.code, err.message, err.retryable, err.retry_after, err.trace_id) == (
        4002,
        "saturated",
        True,
        7.0,
        "abc",
    )


def test_parse_error_without_an_envelope_uses_status_and_headers() -> None:
    err = parse_error(503, CIMultiDict({"Retry-After": "12", "X-Trace-ID": "t1"}), b"<html>")
    assert (err.code, err.retryable, err.retry_after, err.trace_id) == (0, True, 12.0, "t1")
    err = parse_error(400, CIMultiDict(), b"")
    assert not err.retryable
    assert err.retry_after is None


def test_retryable_false_from_chert_wins_over_the_status() -> None:
    body = b'{"success":false,"error":{"status":500,"code":3001,"retryable":false}}'
    assert not parse_error(500, CIMultiDict(), body).retryable


def test_auth_codes_are_auth_failures() -> None:
    for status, code in [(401, 2004), (401, 2012), (401, 2013), (404, 2001), (403, 2005)]:
        assert parse_error(
            status, CIMultiDict(), b'{"error":{"code":%d,"retryable":false}}' % code
        ).is_auth
    assert not parse_error(404, CIMultiDict(), b'{"error":{"code":2011}}').is_auth


@given(
    status=st.integers(400, 599),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
            ),
            max_leaves=10,
        ).map(lambda v: json.dumps({"error": v, "trace_id": v}).encode()),
    ),
    retry_after=st.one_of(st.none(), st.text(max_size=30)),
)
def test_parse_error_never_fails_on_what_comes_back(
    status: int, body: bytes, retry_after: str | None
) -> None:
    headers = CIMultiDict() if retry_after is None else CIMultiDict({"Retry-After": retry_after})
    err = parse_error(status, headers, body)
    assert err.status == status
    assert err.retry_after is None or 0 <= err.retry_after <= 3600


CHAINS = {
    "the same cursor again": {None: ["a", "b"], "c1": ["c"], "c1 again": []},
    "a cycle": {None: ["a", "b"], "c1": ["c"], "c2": ["d"], "c1 again": []},
}


@pytest.mark.parametrize("shape", sorted(CHAINS))
async def test_a_broken_cursor_chain_raises_after_the_pages_read(shape: str) -> None:
    async with paged_chert() as chert:
        if shape == "the same cursor again":
            chert.pages = {None: ([log_row("a"), log_row("b")], "c1"), "c1": ([log_row("c")], "c1")}
        else:
            chert.pages = {
                None: ([log_row("a"), log_row("b")], "c1"),
                "c1": ([log_row("c")], "c2"),
                "c2": ([log_row("d")], "c1"),
            }
        pages: list[Page] = []

        async def read_all(api: ChertApi) -> None:
            async for page in api.events(since="2026-01-01T00:00:00Z", page_size=2):
                pages.append(page)

        async with client(tenant_config(chert.base_url, auth="bearer")) as api:
            with pytest.raises(ChertPagingError, match="already given"):
                await read_all(api)
    want = [k for k in CHAINS[shape] if k != "c1 again"]
    assert [r.get("cursor") for r in chert.requests] == want  # no request loops back
    assert [row["event_id"] for p in pages for row in p.rows] == [
        e for k in want for e in CHAINS[shape][k]
    ]


async def test_a_chain_ending_in_a_null_cursor_is_complete() -> None:
    async with paged_chert() as chert:
        chert.pages = {None: ([log_row("a")], "c1"), "c1": ([log_row("b")], None)}
        async with client(tenant_config(chert.base_url, auth="bearer")) as api:
            pages = [p async for p in api.events(since=None, page_size=1)]
    assert [row["event_id"] for p in pages for row in p.rows] == ["a", "b"]
    assert pages[-1].next_cursor is None


async def test_a_stream_that_never_answers_is_given_up_after_the_api_timeout() -> None:
    async with silent_server() as silent:
        tenant = tenant_config(silent.base_url, timeout=0.3, max_attempts=2)

        async def open_stream(api: ChertApi) -> None:
            async with asyncio.timeout(30):  # a hang fails the test rather than stalls it
                async with api.stream(since=None):
                    pass

        async with client(tenant) as api:
            with pytest.raises(ChertUnreachableError, match=r"no response within 0\.3s"):
                await open_stream(api)
    assert silent.count("/api/v1/events/stream") == 2  # one per attempt
