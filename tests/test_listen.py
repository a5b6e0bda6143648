"""``chert-relay listen`` against the simulator, with a real aiohttp app as the local URL."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.cli import main
from relay.errors import EXIT_CONFIG, ChertApiError
from relay.listen.command import listen_api, listen_tenant
from relay.listen.forwarder import ListenAuthError, Listener
from relay.listen.state import ListenState, StateDirInUseError, default_state_dir
from relay.signing import standard_webhooks_key, standard_webhooks_signature
from relay.simulator import SimTenant, Simulator
from relay.store.embedded import free_port
from tests.support.common import wait_for

API_SECRET = "5f2b8c1d9e4a7f3b6c0d2e8f1a9b4c7d"
HOOK_SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
TENANT = "acme-7a3f"


@dataclass
class LocalApp:
    """The developer's app: records every request; answers from ``statuses`` first."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "boom")

    def ids(self) -> list[str]:
        return [h["webhook-id"] for h, _ in self.requests]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(
        tenants=[SimTenant(slug=TENANT, api_secret=API_SECRET, webhook_secret=HOOK_SECRET)],
        heartbeat_interval=5.0,
    )
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def app() -> AsyncIterator[LocalApp]:
    local = LocalApp()
    web_app = web.Application()
    web_app.router.add_post("/hooks", local.handle)
    runner = web.AppRunner(web_app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    local.url = f"http://{host}:{port}/hooks"
    yield local
    await runner.cleanup()


def _args(sim: Simulator, app: LocalApp, **more: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "tenant": TENANT,
        "forward_to": app.url,
        "events": "*",
        "api_url": sim.base_url,
        "auth": "hmac",
        "api_secret": API_SECRET,
        "config": None,
    }
    values.update(more)
    return argparse.Namespace(**values)


class Running:
    """A listener running as a task, its printed lines kept."""

    def __init__(
        self, sim: Simulator, app: LocalApp, state_dir: Path, attempts: int = 5, **args: Any
    ) -> None:
        self.state = ListenState.open(state_dir)
        if self.state.watermark is None:
            self.state.start_now()
        ns = _args(sim, app, **args)
        self.out = io.StringIO()
        self.listener = Listener(
            listen_tenant(ns, listen_api(ns, {}), self.state.secret),
            self.state,
            out=self.out,
            max_attempts=attempts,
            retry_backoff=0.05,
            poll_interval=0.1,
        )
        self.task = asyncio.create_task(self.listener.run())

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.wait({self.task})


async def _started(sim: Simulator, running: Running) -> None:
    await wait_for(lambda: sim.open_streams == 1 and running.listener.mode == "sse")


def _verify(secret: str, headers: dict[str, str], body: bytes) -> None:
    expected = standard_webhooks_signature(
        standard_webhooks_key(secret),
        headers["webhook-id"],
        int(headers["webhook-timestamp"]),
        body,
    )
    assert headers["webhook-signature"] == expected


async def test_events_arrive_signed_with_one_line_each(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    running = Running(sim, app, tmp_path / "state")
    try:
        await _started(sim, running)
        rows = sim.emit(TENANT, count=3)
        await wait_for(lambda: len(running.lines()) == 3)
    finally:
        await running.stop()
    assert app.ids() == [r["event_id"] for r in rows]
    for (headers, body), row in zip(app.requests, rows, strict=True):
        _verify(running.state.secret, headers, body)
        assert json.loads(body) == row["payload"]  # the envelope, as a sink gets it
        assert headers["X-Chert-Event-Type"] == "message.received"
        assert headers["X-Relay-Source"] == "sse"
    for line, row in zip(running.lines(), rows, strict=True):
        assert f"message.received  {row['event_id']}  -> 200 in " in line
        assert line.endswith(" ms")


async def test_the_first_run_starts_from_now(sim: Simulator, app: LocalApp, tmp_path: Path) -> None:
    sim.emit(TENANT, count=2)  # before: within the overlap a stream re-reads
    await asyncio.sleep(0.01)  # the simulator's times are in milliseconds
    running = Running(sim, app, tmp_path / "state")
    try:
        await _started(sim, running)
        [row] = sim.emit(TENANT)
        await wait_for(lambda: len(app.requests) == 1)
        await wait_for(lambda: len(running.lines()) == 1)
    finally:
        await running.stop()
    assert app.ids() == [row["event_id"]]


async def test_a_local_500_is_retried(sim: Simulator, app: LocalApp, tmp_path: Path) -> None:
    app.statuses = [500]
    running = Running(sim, app, tmp_path / "state")
    try:
        await _started(sim, running)
        [row] = sim.emit(TENANT)
        await wait_for(lambda: len(app.requests) == 2)
        await wait_for(lambda: len(running.lines()) == 2)
    finally:
        await running.stop()
    assert app.ids() == [row["event_id"]] * 2
    first, second = running.lines()
    assert "-> 500 in " in first
    assert "retrying in" in first
    assert "-> 200 in " in second
    assert "[attempt 2]" in second
    assert app.requests[1][0]["X-Relay-Attempt"] == "2"


async def test_a_local_app_that_is_down_is_given_up_on_after_the_attempts(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/hooks"
    running = Running(sim, app, tmp_path / "state", attempts=2, forward_to=down)
    try:
        await _started(sim, running)
        [row] = sim.emit(TENANT)
        await wait_for(lambda: row["event_id"] in running.state.forwarded)
    finally:
        await running.stop()
    first, second = running.lines()
    assert "-> no answer (connection) in " in first
    assert "retrying in" in first
    assert second.endswith("gave up after 2 attempt(s)")


async def test_a_restart_resumes_without_forwarding_twice(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    first = Running(sim, app, state_dir)
    try:
        await _started(sim, first)
        before = sim.emit(TENANT, count=2)
        await wait_for(lambda: len(app.requests) == 2)
    finally:
        await first.stop()
    await wait_for(lambda: sim.open_streams == 0)
    during = sim.emit(TENANT, count=2)  # while nothing listens

    second = Running(sim, app, state_dir)
    try:
        assert second.state.secret == first.state.secret  # the local app keeps its secret
        await wait_for(lambda: len(app.requests) == 4)
        await _started(sim, second)
        after = sim.emit(TENANT)
        await wait_for(lambda: len(app.requests) == 5)
    finally:
        await second.stop()
    assert app.ids() == [r["event_id"] for r in before + during + after]
    assert len(second.lines()) == 3


async def test_without_the_stream_it_polls(
    sim: Simulator, app: LocalApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_stream(self: Listener, api: object) -> None:
        raise ChertApiError(404, 0, "no stream here", retryable=False)

    monkeypatch.setattr(Listener, "_stream", no_stream)
    running = Running(sim, app, tmp_path / "state")
    try:
        await wait_for(lambda: running.listener.mode == "poll")
        rows = sim.emit(TENANT, count=2)
        await wait_for(lambda: len(app.requests) == 2)
    finally:
        await running.stop()
    assert app.ids() == [r["event_id"] for r in rows]
    assert {h["X-Relay-Source"] for h, _ in app.requests} == {"poll"}


async def test_only_the_chosen_types_are_forwarded(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    running = Running(sim, app, tmp_path / "state", events="reaction.*")
    try:
        await _started(sim, running)
        sim.emit(TENANT, type="message.received")
        [wanted] = sim.emit(TENANT, type="reaction.added")
        await wait_for(lambda: len(app.requests) == 1)
        await wait_for(lambda: len(running.state.forwarded) == 2)  # both handled
    finally:
        await running.stop()
    assert app.ids() == [wanted["event_id"]]


async def test_refused_credentials_stop_it(sim: Simulator, app: LocalApp, tmp_path: Path) -> None:
    running = Running(sim, app, tmp_path / "state", api_secret="0" * 32)
    with pytest.raises(ExceptionGroup) as caught:
        await asyncio.wait_for(running.task, 10)
    assert caught.group_contains(ListenAuthError)
    assert app.requests == []


def test_the_secret_is_made_once_per_state_dir(tmp_path: Path) -> None:
    first = ListenState.open(tmp_path / "s")
    assert first.secret.startswith("whsec_")
    assert len(standard_webhooks_key(first.secret)) == 24
    assert ListenState.open(tmp_path / "s").secret == first.secret
    assert (tmp_path / "s" / "secret").stat().st_mode & 0o077 == 0
    assert ListenState.open(tmp_path / "t").secret != first.secret


def test_the_state_dir_is_per_user_and_tenant(tmp_path: Path) -> None:
    assert default_state_dir("t1", {"XDG_STATE_HOME": str(tmp_path)}) == (
        tmp_path / "chert-relay" / "listen" / "t1"
    )
    assert default_state_dir("t1", {}) == Path.home() / ".local/state/chert-relay/listen/t1"


def test_a_tenant_that_is_not_a_slug_is_a_usage_error(tmp_path: Path) -> None:
    argv = ["listen", "--tenant", "../x", "--forward-to", "http://127.0.0.1:3000/hooks"]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--state-dir", str(tmp_path / "state")])
    assert caught.value.code == 2


def test_missing_credentials_exit_78_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("CHERT_API_URL", "CHERT_API_AUTH", "CHERT_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "state"
    argv = ["listen", "--tenant", TENANT, "--forward-to", "http://127.0.0.1:3000/hooks"]
    assert main([*argv, "--state-dir", str(state)]) == EXIT_CONFIG
    assert "no API credentials" in capsys.readouterr().err
    monkeypatch.setenv("CHERT_API_SECRET", "env:CHERT_TEST_UNSET_VARIABLE")
    assert main([*argv, "--state-dir", str(state)]) == EXIT_CONFIG
    assert "CHERT_TEST_UNSET_VARIABLE is not set" in capsys.readouterr().err
    assert not state.exists()


def test_a_config_file_without_the_tenant_or_its_api_secret_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[tenants]]\nslug = "{TENANT}"\nwebhook_secrets = ["{HOOK_SECRET}"]\n'
        '[tenants.poll]\nmode = "off"\n'
        '[[tenants.sinks]]\nname = "s"\nurl = "http://127.0.0.1:9/s"\n'
    )
    base = ["-c", str(config), "listen", "--forward-to", "http://127.0.0.1:3000/hooks"]
    state = ["--state-dir", str(tmp_path / "state")]
    assert main([*base, "--tenant", "nobody", *state]) == EXIT_CONFIG
    assert "no tenant 'nobody'" in capsys.readouterr().err
    assert main([*base, "--tenant", TENANT, *state]) == EXIT_CONFIG
    assert "api.signing_secret" in capsys.readouterr().err
    assert main([*base, "--tenant", TENANT, "--api-secret", API_SECRET, *state]) == EXIT_CONFIG
    assert "not both" in capsys.readouterr().err


async def test_the_command_prints_the_secret_a_line_per_event_and_exits_0_on_sigterm(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CHERT_API_URL": sim.base_url,
        "CHERT_API_AUTH": "hmac",
        "CHERT_API_SECRET": API_SECRET,
        "XDG_STATE_HOME": str(tmp_path / "xdg"),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "listen",
        "--tenant",
        TENANT,
        "--forward-to",
        app.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    try:
        head = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(4)]
        secret = head[1].split()[-1]
        assert head[1].startswith("Your webhook signing secret is whsec_")
        saved = tmp_path / "xdg" / "chert-relay" / "listen" / TENANT / "secret"
        assert saved.read_text().strip() == secret
        await wait_for(lambda: sim.open_streams == 1, timeout=30)
        [row] = sim.emit(TENANT)
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert f"{row['event_id']}  -> 200 in " in line
        [(headers, body)] = app.requests
        _verify(secret, headers, body)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    rest = (await proc.stdout.read()).decode()
    assert rest.startswith("Stopped: 1 event(s) forwarded, 0 given up on.")


def test_a_second_listen_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    held = ListenState.open(tmp_path / "s").locked()
    second = ListenState.open(tmp_path / "s").locked()
    with held, pytest.raises(StateDirInUseError) as caught, second:
        pass
    assert caught.value.exit_code == 75


async def test_the_command_exits_78_when_chert_refuses_the_credentials(
    sim: Simulator, app: LocalApp, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "--log-format",
        "text",
        "listen",
        "--tenant",
        TENANT,
        "--forward-to",
        app.url,
        "--api-url",
        sim.base_url,
        "--api-secret",
        "0" * 32,
        "--state-dir",
        str(tmp_path / "state"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == EXIT_CONFIG
    assert "Chert refused the API credentials" in err.decode()
    assert "Traceback" not in err.decode()
