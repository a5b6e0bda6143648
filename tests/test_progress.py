"""Progress of long commands: a tqdm bar on a terminal, plain lines otherwise — checked
through ``chert-relay dlq replay`` and ``purge`` run as a user runs them, with stderr
a pipe and with stderr a pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from redis.asyncio import Redis

from relay.progress import Meter
from relay.store.deadletters import DeadLetterStore, Filter
from tests.support.common import TENANT
from tests.support.deadletters import OTHER, make_dead_letters, two_tenants, two_tenants_data
from tests.support.delivery import Sink, sinks
from tests.support.process import write_toml

EVENTS = {
    TENANT: [(f"p{i}", "message.received") for i in range(3)],
    OTHER: [("o1", "message.received")],
}


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    meter = Meter(out, "dlq replay", unit="dead letters", total=450, interval=3600)
    assert not meter.is_bar
    meter.update(200, 450)
    meter.update(400, 450)  # within the interval: no line
    meter.update(450, 450)
    meter.close()
    assert out.getvalue() == (
        "dlq replay: 200/450 dead letters\ndlq replay: 450/450 dead letters\n"
    )
    out = io.StringIO()
    meter = Meter(out, "backfill acme", unit="rows", interval=0)
    meter.update(7, detail="page 1")
    meter.close()
    assert out.getvalue() == "backfill acme: 7 rows (page 1)\nbackfill acme: 7 rows (page 1)\n"


async def dead_letters_on_disk(redis: Redis, redis_url: str, tmp_path: Path) -> Path:
    async with sinks(Sink(lambda s, r: (400, {}))) as (sink,):
        await make_dead_letters(redis, two_tenants(redis_url, sink.url), EVENTS)
        return write_toml(tmp_path / "relay.toml", two_tenants_data(redis_url, sink.url))


def dlq(
    config: Path, *argv: str, stderr: int, stdout: int = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "-c", str(config), "dlq", *argv],
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
    )


async def test_dlq_replay_prints_plain_progress_lines_into_a_pipe(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    config = await dead_letters_on_disk(redis, redis_url, tmp_path)
    proc = dlq(config, "replay", "--tenant", TENANT, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    text = stderr.decode()
    assert "dlq replay: 6/6 dead letters\n" in text  # three events, two sinks
    assert "\r" not in text
    assert "\x1b[" not in text
    assert "6 dead letter(s) replayed, 0 skipped" in text
    # A count per sink; the entries themselves only with --verbose.
    assert stdout.decode().splitlines() == [
        f"{TENANT}/all: 3 replayed",
        f"{TENANT}/crm: 3 replayed",
    ]
    assert (
        len(await DeadLetterStore(redis, two_tenants(redis_url, "http://x/")).find(Filter())) == 1
    )


async def test_dlq_purge_draws_a_bar_on_a_terminal(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    config = await dead_letters_on_disk(redis, redis_url, tmp_path)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = dlq(config, "purge", "--all", stderr=follower, stdout=subprocess.DEVNULL)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    screen = b"".join(chunks).decode(errors="replace")
    assert "dlq purge: 100%" in screen
    assert "7/7" in screen
    assert "\r" in screen  # redrawn in place
    assert "7 dead letter(s) purged, 0 skipped" in screen
    assert await DeadLetterStore(redis, two_tenants(redis_url, "http://x/")).find(Filter()) == []
