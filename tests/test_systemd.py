"""systemd: the notify protocol on a real AF_UNIX datagram socket, the watchdog from the
event loop, and the shipped units (``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from relay.config import parse_config
from relay.service import Service
from relay.store.embedded import free_port
from relay.systemd import Notifier
from tests.support.common import config_dict, wait_for
from tests.support.process import write_toml
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
MAX_EXPOSURE = 3.0


class NotifySocket:
    """What systemd listens on: a datagram socket; ``messages`` drains what arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.seen += out
        return out

    def count(self, key: str) -> int:
        """How many messages so far set ``key``."""
        self.messages()
        return len([m for m in self.seen if key in m])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def test_the_notifier_speaks_sd_notify_and_leaves_the_environment_clean(
    notify: NotifySocket,
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "3000000", "OTHER": "x"}
    n = Notifier(env)
    assert env == {"OTHER": "x"}  # child processes do not notify in the relay's name
    assert n.enabled
    assert n.watchdog_interval == 1.5
    n.ready("serving")
    n.status("3 webhooks accepted")
    n.stopping()
    got = notify.messages()
    assert got[0]["READY"] == "1"
    assert got[0]["STATUS"] == "serving"
    assert got[0]["MAINPID"] == str(os.getpid())
    assert got[1] == {"STATUS": "3 webhooks accepted"}
    assert got[2]["STOPPING"] == "1"
    n.close()


def test_a_notify_socket_nobody_reads_never_blocks_the_sender(
    notify: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel queues a few datagrams per socket (net.unix.max_dgram_qlen); past that,
    # a blocking send would hang the relay's event loop until someone read.
    n = Notifier({"NOTIFY_SOCKET": str(notify.path)})
    sent = [n.send(watchdog=1) for _ in range(2000)]
    assert sent[0]
    assert not all(sent)  # the queue filled: those messages were dropped, not waited on
    assert "is not being read" in caplog.text
    assert len([r for r in caplog.records if "is not being read" in r.message]) == 1
    notify.messages()  # read: the queue has room again
    assert n.send(stopping=1)
    assert notify.messages() == [{"STOPPING": "1"}]
    n.close()


def test_the_notifier_reaches_an_abstract_socket() -> None:
    name = f"chert-relay-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send(ready=1)
        assert s.recv(100) == b"READY=1"
        n.close()


def test_no_notify_socket_no_watchdog_and_another_pids_watchdog_is_not_ours(
    notify: NotifySocket,
) -> None:
    off = Notifier({})
    assert not off.enabled
    assert off.watchdog_interval is None
    assert not off.send(ready=1)
    other = Notifier(
        {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other.enabled
    assert other.watchdog_interval is None


async def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_blocked(
    notify: NotifySocket, redis_url: str
) -> None:
    config = parse_config(config_dict(redis_url=redis_url), env={})
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"})
    service = Service(config, roles=("receiver", "admin"), notifier=notifier)
    task = asyncio.create_task(service.run())
    try:
        await wait_for(lambda: any("READY" in m for m in notify.messages() + notify.seen), 30)
        await wait_for(lambda: [m for m in notify.messages() if "WATCHDOG" in m], 10)
        notify.messages()  # every ping sent so far is in the socket's buffer: drop them
        time.sleep(0.5)  # the event loop is blocked: 10 ping intervals pass
        assert [m for m in notify.messages() if "WATCHDOG" in m] == []
        # Unblocked, the loop pings again.
        await wait_for(lambda: [m for m in notify.messages() if "WATCHDOG" in m], 10)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def test_a_relay_process_tells_systemd_ready_status_watchdog_and_stopping(
    tmp_path: Path, notify: NotifySocket, redis_url: str
) -> None:
    port, admin = free_port(), free_port()
    data = config_dict(redis_url=redis_url)
    data["server"]["listen"] = f"127.0.0.1:{port}"
    data["admin"]["listen"] = f"127.0.0.1:{admin}"
    path = write_toml(tmp_path / "relay.toml", data)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    log = (tmp_path / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "-c", str(path), "--log-format", "text", "run"],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        ready = await wait_for(lambda: [m for m in notify.messages() if "READY" in m], 30)
        # READY=1 only once every listener is bound: both answer now.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 200
            url = f"http://127.0.0.1:{port}/webhooks/chert/nobody"
            async with session.post(url, data=b"{}") as resp:
                assert resp.status == 404  # the receiver answers (no such tenant)
        assert ready[0]["MAINPID"] == str(proc.pid)
        status = ready[0]["STATUS"]
        assert "webhooks accepted" in status
        assert "deliveries made" in status
        assert status.index("webhooks accepted") < status.index("deliveries made")
        await wait_for(lambda: notify.count("WATCHDOG") >= 2, 10)
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proc.poll() is not None, 60)
        assert proc.returncode == 0
        assert notify.count("STOPPING") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _analyze() -> str:
    return tool("systemd-analyze")


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointing at this checkout's chert-relay, so that
    ``systemd-analyze verify`` can resolve the binary; the worker template instantiated."""
    binary = Path(sys.executable).parent / "chert-relay"
    assert binary.exists(), binary
    out = tmp_path_factory.mktemp("units")
    for unit in UNITS:
        text = unit.read_text().replace("/opt/chert-relay/bin/chert-relay", str(binary))
        name = unit.name.replace("@.service", "@9101.service")
        (out / name).write_text(text)
    return out


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_each_unit_verifies_cleanly(unit_dir: Path, unit: str) -> None:
    name = unit.replace("@.service", "@9101.service")
    out = subprocess.run(
        [_analyze(), "verify", str(unit_dir / name)], capture_output=True, text=True, cwd=unit_dir
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("unit", [u.name for u in UNITS])
def test_each_unit_is_hardened_to_an_exposure_of_3_or_less(unit_dir: Path, unit: str) -> None:
    name = unit.replace("@.service", "@9101.service")
    threshold = f"--threshold={int(MAX_EXPOSURE * 10)}"
    out = subprocess.run(
        [_analyze(), "security", "--offline=true", threshold, str(unit_dir / name)],
        capture_output=True,
        text=True,
        cwd=unit_dir,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, out.stdout
    assert out.returncode == 0, out.stdout


def test_every_unit_bounds_its_memory() -> None:
    """MemoryHigh (throttle and reclaim) below MemoryMax (the kill), in every unit."""
    sizes = {"K": 2**10, "M": 2**20, "G": 2**30}
    pattern = re.compile(r"^(MemoryHigh|MemoryMax)=(\d+)([KMG])$", re.M)
    for unit in UNITS:
        found = {k: int(n) * sizes[u] for k, n, u in pattern.findall(unit.read_text())}
        assert set(found) == {"MemoryHigh", "MemoryMax"}, unit
        assert found["MemoryHigh"] < found["MemoryMax"], unit


def test_every_unit_is_type_notify_with_a_watchdog() -> None:
    for unit in UNITS:
        text = unit.read_text()
        assert "Type=notify" in text, unit
        assert re.search(r"^WatchdogSec=\d+", text, re.M), unit
        assert "NotifyAccess=main" in text, unit


def test_the_binary_every_unit_runs_is_the_one_the_readme_installs() -> None:
    """The units run /opt/chert-relay/bin/chert-relay: the README (and each unit's
    header) says how to make it — a virtualenv there with the package — and how to lay
    out /etc/chert-relay so that the units' dynamic user can read its configuration."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### systemd") : readme.index("### Containers")]
    venv = re.search(r"^\s+python3 -m venv (\S+) && \1/bin/pip install \.$", section, re.M)
    assert venv is not None, "the README's systemd section does not say how to install"
    binary = f"{venv.group(1)}/bin/chert-relay"
    # The configuration is read by a dynamic user: directory and file readable by others.
    assert readable_by_others(section) == 2  # the directory and relay.toml
    for unit in UNITS:
        text = unit.read_text()
        execs = re.findall(r"^ExecStart=(\S+)", text, re.M)
        assert execs == [binary], unit
        header = text[: text.index("[Unit]")]
        assert f"python3 -m venv {venv.group(1)} && {venv.group(1)}/bin/pip install ." in header
        readable_by_others(header)


def readable_by_others(text: str) -> int:
    """Each ``install`` into /etc/chert-relay in ``text`` leaves it readable by any
    user (a directory: listable too); how many there are."""
    made = re.findall(r"install (-d )?-m (0\d+) (?:\S+ )?/etc/chert-relay", text)
    for directory, mode in made:
        needed = 0o005 if directory else 0o004
        assert int(mode, 8) & needed == needed, mode
    return len(made)
