"""Start-up failures as an operator meets them: one line naming the cause and the thing,
no traceback, and each its own exit code (the README's table)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from relay.errors import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_OSERR,
    EXIT_OSFILE,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    RESTART_CANNOT_FIX,
)
from relay.store.embedded import EmbeddedRedis, free_port
from tests.support.common import config_dict
from tests.support.process import write_toml


def command(config: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "relay", "--log-format", "text", "-c", str(config), *argv]


def relay(
    config: Path, *argv: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``chert-relay`` to its exit (a start-up failure exits at once)."""
    return subprocess.run(
        [*prefix, *command(config, *argv)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def failure_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line that says why, and nothing like a traceback."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if "cannot start:" in ln or "refusing to start" in ln]
    assert len(lines) == 1, text
    return lines[0]


def config(tmp_path: Path, redis_url: str | None, **sections: Any) -> Path:
    data = config_dict(redis_url=redis_url)
    data["server"]["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    data.setdefault("relay", {})["state_dir"] = str(tmp_path / "state")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return write_toml(tmp_path / "relay.toml", data)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_listen_address_in_use_exits_75_naming_it(
    tmp_path: Path, redis_url: str, busy_port: int
) -> None:
    path = config(tmp_path, redis_url, server={"listen": f"127.0.0.1:{busy_port}"})
    out = relay(path, "serve")
    assert out.returncode == EXIT_TEMPFAIL
    line = failure_line(out)
    assert f"receiver listen address 127.0.0.1:{busy_port} is in use" in line
    # the admin listener too, and for a worker on its own address
    path = config(tmp_path, redis_url, admin={"worker_listen": f"127.0.0.1:{busy_port}"})
    out = relay(path, "worker")
    assert out.returncode == EXIT_TEMPFAIL
    assert f"admin listen address 127.0.0.1:{busy_port} is in use" in failure_line(out)


def test_a_listen_address_not_on_this_host_exits_71(tmp_path: Path, redis_url: str) -> None:
    path = config(tmp_path, redis_url, server={"listen": "192.0.2.1:8080"})  # TEST-NET-1
    out = relay(path, "serve")
    assert out.returncode == EXIT_OSERR
    assert "receiver listen address 192.0.2.1:8080 cannot be used" in failure_line(out)


def test_a_listen_address_not_permitted_exits_77(tmp_path: Path, redis_url: str) -> None:
    # Root may bind any port: take away the capability that lets it.
    prefix = ("setpriv", "--bounding-set", "-net_bind_service") if os.geteuid() == 0 else ()
    port = next(p for p in range(80, 1024) if _free(p))
    path = config(tmp_path, redis_url, server={"listen": f"127.0.0.1:{port}"})
    out = relay(path, "serve", prefix=prefix)
    assert out.returncode == EXIT_NOPERM, out.stdout + out.stderr
    assert f"receiver listen address 127.0.0.1:{port} is not permitted" in failure_line(out)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_redis_unreachable_exits_69_naming_the_url_without_its_password(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"redis://:hunter2-secret@127.0.0.1:{port}/0"
    path = config(tmp_path, url, redis={"startup_wait": "300ms"})
    out = relay(path, "serve")
    assert out.returncode == EXIT_UNAVAILABLE
    line = failure_line(out)
    assert f"Redis at redis://***@127.0.0.1:{port}/0 did not answer within 0.3s" in line
    assert "hunter2" not in out.stdout + out.stderr


async def test_a_redis_that_comes_up_during_startup_wait_is_used(tmp_path: Path) -> None:
    port = free_port()
    path = config(tmp_path, f"redis://127.0.0.1:{port}/0", redis={"startup_wait": "60s"})
    proc = subprocess.Popen(
        command(path, "serve"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = EmbeddedRedis(tmp_path / "late-redis", port=port)
    try:
        assert proc.stdout is not None
        waiting = _line_with(proc, "does not answer yet")  # it says so, and waits
        assert "waiting up to 60s" in waiting, waiting
        await server.start()
        _line_with(proc, "admin listening on")
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        await server.stop()


def _line_with(proc: subprocess.Popen[str], needle: str) -> str:
    """The first line of the process's output holding ``needle`` (it exits otherwise)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if needle in line:
            return line
    raise AssertionError(f"the relay exited ({proc.wait()}) without saying {needle!r}")


async def test_a_redis_that_can_evict_exits_78_in_one_line(
    tmp_path: Path, redis_url: str, redis: Redis
) -> None:
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        out = relay(config(tmp_path, redis_url), "serve")
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")
    assert out.returncode == EXIT_CONFIG
    assert "maxmemory-policy is 'allkeys-lru'" in failure_line(out)


def test_a_state_dir_that_cannot_be_written_exits_73(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    path = config(tmp_path, None, relay={"state_dir": str(blocker / "state")})
    out = relay(path, "run")
    assert out.returncode == EXIT_CANTCREAT
    assert f"the state directory {blocker / 'state'} cannot be written" in failure_line(out)


def test_a_missing_redis_server_exits_72(tmp_path: Path) -> None:
    path = config(tmp_path, None, redis={"server_binary": "redis-server-not-installed"})
    out = relay(path, "run")
    assert out.returncode == EXIT_OSFILE
    line = failure_line(out)
    assert "'redis-server-not-installed' was not found on PATH" in line
    assert "apt-get install redis-server" in line


def test_an_embedded_redis_server_that_fails_exits_69_with_its_words(tmp_path: Path) -> None:
    broken = tmp_path / "redis-server-broken"
    broken.write_text("#!/bin/sh\necho 'FATAL: bad config directive' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    path = config(tmp_path, None, redis={"server_binary": str(broken)})
    out = relay(path, "run")
    assert out.returncode == EXIT_UNAVAILABLE
    line = failure_line(out)
    assert "redis-server exited at start-up" in line
    assert "FATAL: bad config directive" in line


@pytest.mark.parametrize("path_length", ["short", "too long for a socket"])
def test_a_second_relay_on_the_same_state_dir_exits_75(tmp_path: Path, path_length: str) -> None:
    # Too long a path for a Unix socket puts the embedded server on a TCP port, which
    # nothing records: the data directory's lock must still keep a second server off
    # the same AOF.
    state = tmp_path / "state" if path_length == "short" else tmp_path / ("s" * 120)
    path = config(tmp_path, None, relay={"state_dir": str(state)})
    first = subprocess.Popen(
        command(path, "run"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _line_with(first, "admin listening on")
        (tmp_path / "second").mkdir()
        other = config(tmp_path / "second", None, relay={"state_dir": str(state)})
        out = relay(other, "run")
        assert out.returncode == EXIT_TEMPFAIL
        assert "a redis-server is already running on" in failure_line(out)
        out = relay(other, "dlq", "list")
        if path_length == "short":  # an operator's command shares the running server
            assert out.returncode == 0, out.stderr
        else:  # it cannot find it, and starts none beside it
            assert out.returncode == EXIT_TEMPFAIL
            assert "a redis-server is already running on" in failure_line(out)
    finally:
        first.terminate()
        first.wait(timeout=60)
        if first.stdout is not None:
            first.stdout.close()


def test_a_bad_config_exits_78_in_one_line_listing_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nmax_body = 1\n[[tenants]]\nslug = "a"\nwebhook_secrets = ["x"]\n'
        '[tenants.poll]\nmode = "sse"\n'
        '[[tenants.sinks]]\nname = "s"\nurl = "http://x"\ntimeout = "soon"\n'
    )
    out = relay(path, "serve")
    assert out.returncode == EXIT_CONFIG
    line = failure_line(out)
    assert "server.max_body: unknown key" in line
    assert "tenants[0].sinks[0].timeout" in line
    # a tenant-level problem is found although a field of the tenant failed too
    assert "tenants[0]: poll.mode is 'sse' but api.signing_secret is not set" in line


def test_check_config_reports_field_and_tenant_problems_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[server]\nmax_body_bytes = 1\n"
        '[[tenants]]\nslug = "a"\nwebhook_secrets = ["x"]\n[tenants.poll]\nmode = "sse"\n'
        '[[tenants.sinks]]\nname = "s"\nurl = "ftp://x"\n'
        '[[tenants.sinks]]\nname = "s"\nurl = "http://x"\n'
        '[[tenants]]\nslug = "b"\n[tenants.poll]\nmode = "always"\n'
        '[[tenants.sinks]]\nname = "t"\nurl = "http://y"\n'
    )
    out = relay(path, "check-config")
    assert out.returncode == EXIT_CONFIG
    text = out.stderr
    for needle in (
        "server.max_body_bytes:",
        "tenants[0].sinks[0].url:",
        "tenants[0]: poll.mode is 'sse' but api.signing_secret is not set",
        "tenants[0].sinks: sink names must be unique within a tenant: s",
        "tenants[1]: poll.mode is 'always' but api.signing_secret is not set",
    ):
        assert needle in text, text


def test_restart_cannot_fix_exactly_what_the_units_prevent() -> None:
    units = Path(__file__).resolve().parent.parent / "systemd"
    for unit in units.glob("*.service"):
        prevent = next(
            line for line in unit.read_text().splitlines() if line.startswith("RestartPrevent")
        )
        codes = {int(c) for c in prevent.split("=", 1)[1].split()}
        assert codes == set(RESTART_CANNOT_FIX), unit
