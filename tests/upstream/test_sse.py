"""The SSE line parser and stream reader (relay.upstream.sse), on real asyncio byte streams."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.upstream.sse import SseIdleError, SseMessage, SseParser, read_messages


def parse_lines(lines: list[str]) -> list[SseMessage]:
    parser = SseParser()
    out = []
    for line in lines:
        msg = parser.feed_line(line)
        if msg is not None:
            out.append(msg)
    return out


def test_data_lines_join_and_blank_line_dispatches() -> None:
    msgs = parse_lines(['data: {"a":', "data: 1}", "", "data:x", ""])
    assert msgs == [SseMessage("message", '{"a":\n1}'), SseMessage("message", "x")]


def test_comments_are_heartbeats_not_messages() -> None:
    parser = SseParser()
    for line in [": heartbeat", "", ":", ""]:
        assert parser.feed_line(line) is None
    assert parser.comments == 2


def test_event_close_without_data_is_a_message() -> None:
    assert parse_lines(["event: close", ""]) == [SseMessage("close", "")]
    assert parse_lines(["event: close", 'data: {"reason":"lifetime"}', ""]) == [
        SseMessage("close", '{"reason":"lifetime"}')
    ]


def test_only_one_leading_space_is_stripped_and_unknown_fields_ignored() -> None:
    msgs = parse_lines(["retry: 5", "foo: bar", "id: 7", "data:  two", ""])
    assert msgs == [SseMessage("message", " two", id="7")]


def test_event_name_does_not_leak_into_the_next_message() -> None:
    msgs = parse_lines(["event: custom", "data: 1", "", "data: 2", ""])
    assert [m.event for m in msgs] == ["custom", "message"]


_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\0"),
    max_size=40,
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["message", "close", "x"]), st.lists(_text, min_size=1, max_size=4)
        ),
        max_size=6,
    )
)
def test_round_trip(messages: list[tuple[str, list[str]]]) -> None:
    lines: list[str] = [": hello", ""]
    for event, data in messages:
        if event != "message":
            lines.append(f"event: {event}")
        lines += [f"data: {d}" for d in data]
        lines.append("")
    parsed = parse_lines(lines)
    assert parsed == [SseMessage(e, "\n".join(d)) for e, d in messages]


async def collect(reader: asyncio.StreamReader, idle: float = 5.0) -> list[SseMessage]:
    return [m async for m in read_messages(reader, idle_timeout=idle)]


async def test_reader_handles_crlf_and_drops_an_unfinished_message_at_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b": hb\r\ndata: one\r\n\r\ndata: two\n\ndata: cut")
    reader.feed_eof()
    assert [m.data for m in await collect(reader)] == ["one", "two"]


async def test_reader_raises_idle_when_silent() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"data: one\n\n")
    got: list[str] = []

    async def drain() -> None:
        async for m in read_messages(reader, idle_timeout=0.05):
            got.append(m.data)

    with pytest.raises(SseIdleError):
        await drain()
    assert got == ["one"]


async def test_heartbeats_keep_the_stream_alive() -> None:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for _ in range(20):  # 1 s of heartbeats, twice the idle limit
            reader.feed_data(b": hb\n")
            await asyncio.sleep(0.05)
        reader.feed_data(b"data: last\n\n")
        reader.feed_eof()

    task = asyncio.create_task(feed())
    assert [m.data for m in await collect(reader, idle=0.5)] == ["last"]
    await task
