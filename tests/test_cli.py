"""The command line: check-config and sign, as a user runs them; every command's options."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from relay.cli import build_parser
from relay.signing import verify_webhook
from relay.store.embedded import EmbeddedRedis
from tests.support.common import TENANT, WEBHOOK_SECRET, config_dict, envelope
from tests.support.process import write_toml

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.example.toml"


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "--log-format", "text", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_example() -> None:
    out = cli("--config", str(EXAMPLE), "check-config")
    assert out.returncode == 0, out.stderr
    assert b"ok (1 tenant(s), 2 sink(s))" in out.stdout
    assert b"literal secret" in out.stderr


def test_the_config_option_may_follow_the_command(tmp_path: Path) -> None:
    out = cli("check-config", "--config", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 'nowhere'\n")
    out = cli("--config", str(EXAMPLE), "check-config", "-c", str(bad))  # the later one wins
    assert out.returncode == 78
    assert b"server.listen" in out.stdout + out.stderr
    out = cli("dlq", "list", "--config", str(bad))
    assert out.returncode == 78


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["serve"],
        ["worker"],
        ["check-config"],
        ["sign", "--tenant", "t"],
        ["backfill", "--tenant", "t", "--since", "2026-05-01T00:00:00Z"],
        ["simulate"],
        ["dlq", "list"],
        ["dlq", "show", "--tenant", "t", "--sink", "s", "evt_1"],
        ["dlq", "replay"],
        ["dlq", "purge"],
        ["sinks", "list"],
        ["sinks", "pause", "--tenant", "t", "--sink", "s"],
        ["sinks", "resume", "--tenant", "t", "--sink", "s"],
        ["sinks", "test", "--tenant", "t", "--sink", "s"],
    ],
    ids=" ".join,
)
def test_every_command_takes_the_config_option_before_or_after_its_name(
    command: list[str],
) -> None:
    parser = build_parser()
    assert parser.parse_args(command).config is None
    assert parser.parse_args(["-c", "a.toml", *command]).config == "a.toml"
    assert parser.parse_args([*command, "-c", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["-c", "a.toml", *command, "--config", "b.toml"]).config == "b.toml"
    if len(command) > 1 and command[0] in ("dlq", "sinks"):  # and between it and its action
        parsed = parser.parse_args([command[0], "-c", "d.toml", *command[1:]])
        assert parsed.config == "d.toml"


def test_sign_prints_headers_the_receiver_accepts(tmp_path: Path) -> None:
    body = json.dumps(envelope("chert:msg:cli")).encode()
    out = cli("sign", "--tenant", "acme-7a3f", "--secret", WEBHOOK_SECRET, "--json", stdin=body)
    assert out.returncode == 0, out.stderr
    headers = json.loads(out.stdout)
    assert headers["X-Webhook-Event-Id"] == "chert:msg:cli"
    verify_webhook(CIMultiDict(headers), body, [WEBHOOK_SECRET.encode()], tolerance=300)

    legacy = cli(
        "sign", "--tenant", "acme-7a3f", "--secret", WEBHOOK_SECRET, "--legacy", stdin=body
    )
    line = next(x for x in legacy.stdout.decode().splitlines() if x.startswith("x-chert-signature"))
    ts = int(line.split(",")[1])
    assert abs(ts - time.time()) < 60


def test_sign_takes_the_secret_from_the_config(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "relay.toml", config_dict())
    body = json.dumps(envelope("chert:msg:cfg")).encode()
    out = cli(
        "--config",
        str(path),
        "sign",
        "--tenant",
        "acme-7a3f",
        "--curl",
        "http://127.0.0.1:8080",
        stdin=body,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"curl -sS -X POST http://127.0.0.1:8080/webhooks/chert/acme-7a3f")
    assert WEBHOOK_SECRET.encode() not in out.stdout
    missing = cli("--config", str(path), "sign", "--tenant", "nobody", stdin=body)
    assert missing.returncode == 2
    assert b"has no webhook secret" in missing.stderr


def ran_before(state: Path) -> None:
    """The embedded Redis a relay on ``state`` would have left: started and stopped."""
    server = EmbeddedRedis(state / "redis")
    asyncio.run(server.start())
    asyncio.run(server.stop())


def test_dlq_list_on_the_embedded_default_with_no_relay_running(tmp_path: Path) -> None:
    data = config_dict()
    data["relay"]["state_dir"] = str(tmp_path / "state")
    path = write_toml(tmp_path / "relay.toml", data)
    ran_before(tmp_path / "state")
    out = cli("--config", str(path), "dlq", "list")
    assert out.returncode == 0, out.stderr
    assert b"0 dead letter(s)" in out.stderr
    assert not (tmp_path / "state" / "redis" / "redis.sock").exists()  # stopped again


@pytest.mark.parametrize(
    "command",
    [
        ["dlq", "list"],
        ["events", "list"],
        ["sinks", "pause", "--tenant", TENANT, "--sink", "crm"],
        ["backfill", "--tenant", TENANT, "--since", "2026-05-01T00:00:00Z"],
    ],
)
def test_a_command_on_a_state_dir_the_relay_never_used_is_refused_not_run_empty(
    tmp_path: Path, command: list[str]
) -> None:
    # The example's state_dir is relative: from another working directory (or a shell
    # without the unit's CHERT_RELAY__RELAY__STATE_DIR) an operator's command would
    # otherwise start an empty Redis there, list no dead letters and pause nothing.
    data = config_dict()
    data["relay"]["state_dir"] = "var/chert-relay"
    data["tenants"][0]["api"] = {"signing_secret": "x" * 32}  # backfill needs one
    path = write_toml(tmp_path / "relay.toml", data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--log-format", "text", "-c", str(path), *command],
        capture_output=True, timeout=60, check=False, cwd=elsewhere,
    )  # fmt: skip
    assert out.returncode == 69, out.stderr
    said = out.stderr.decode()
    assert f"no relay state at {elsewhere / 'var/chert-relay/redis'}" in said
    assert "relay.state_dir = 'var/chert-relay' is relative to the working directory" in said
    assert not (elsewhere / "var").exists()  # nothing made there


def test_commands_that_do_not_serve_the_admin_listener_do_not_need_its_tokens(
    tmp_path: Path,
) -> None:
    """An operator's shell lacks the service's admin-token variables: ``dlq list``
    does not use them, so it must not fail on them; the service and ``check-config``
    still refuse a configuration whose tokens cannot be read."""
    data = config_dict()
    data["relay"]["state_dir"] = str(tmp_path / "state")
    data["admin"] = {
        "token": "env:CHERT_RELAY_TEST_UNSET_ADMIN_TOKEN",
        "tokens": [
            {
                "name": "support",
                "token": "file:support.token",  # not there
                "scope": "read",
                "tenants": ["*"],
            }
        ],
    }
    path = write_toml(tmp_path / "relay.toml", data)
    ran_before(tmp_path / "state")
    out = cli("--config", str(path), "dlq", "list")
    assert out.returncode == 0, out.stderr
    assert b"0 dead letter(s)" in out.stderr
    out = cli("--config", str(path), "sinks", "list")
    assert out.returncode == 0, out.stderr
    assert b"3 sink(s), 0 paused" in out.stderr
    for strict in (["check-config"], ["run"]):
        out = cli("--config", str(path), *strict)
        assert out.returncode == 78, (strict, out.stderr)
        said = out.stdout + out.stderr
        assert b"admin.token: environment variable CHERT_RELAY_TEST_UNSET_ADMIN_TOKEN" in said
        assert b"admin.tokens[0].token: cannot read secret file" in said


def test_redis_commands_do_not_need_the_services_other_secrets(tmp_path: Path) -> None:
    """Installed under systemd, the webhook and sink secrets are ``env:`` variables that
    only the unit's ``EnvironmentFile`` sets: ``dlq``, ``events`` and ``sinks`` read and
    change the relay's Redis and must work from a shell without them. The service,
    ``check-config`` and ``sinks test`` (which signs with the sink's secret) still
    need them, and name the one missing."""
    data = config_dict()
    data["relay"]["state_dir"] = str(tmp_path / "state")
    tenant = data["tenants"][0]
    tenant["webhook_secrets"] = ["env:CHERT_RELAY_TEST_UNSET_WEBHOOK"]
    tenant["sinks"][0]["secret"] = "env:CHERT_RELAY_TEST_UNSET_SINK"
    tenant["sinks"][1]["proxy"] = "http://relay@127.0.0.1:9"
    tenant["sinks"][1]["proxy_password"] = "file:proxy.password"  # not there
    tenant["api"] = {"signing_secret": "env:CHERT_RELAY_TEST_UNSET_API"}
    path = write_toml(tmp_path / "relay.toml", data)
    ran_before(tmp_path / "state")
    for command, said in (
        (["dlq", "list"], b"0 dead letter(s)"),
        (["events", "list"], b"0 event(s)"),
        (["sinks", "list"], b"3 sink(s), 0 paused"),
    ):
        out = cli("--config", str(path), *command)
        assert out.returncode == 0, (command, out.stderr)
        assert said in out.stderr + out.stdout, command
    out = cli("--config", str(path), "sinks", "test", "--tenant", TENANT, "--sink", "crm")
    assert out.returncode == 78, out.stderr
    assert b"environment variable CHERT_RELAY_TEST_UNSET_SINK is not set" in out.stderr
    for strict in (["check-config"], ["run"], ["sign", "--tenant", TENANT]):
        out = cli("--config", str(path), *strict)
        assert out.returncode == 78, (strict, out.stderr)
        said = out.stdout + out.stderr
        assert b"webhook_secrets[0]: environment variable CHERT_RELAY_TEST_UNSET_WEBHOOK" in said
        assert b"sinks[0].secret: environment variable CHERT_RELAY_TEST_UNSET_SINK" in said
        assert b"api.signing_secret: environment variable CHERT_RELAY_TEST_UNSET_API" in said
        assert b"sinks[1].proxy_password: cannot read secret file" in said


def test_the_config_file_comes_from_chert_relay_config_without_the_option(
    tmp_path: Path,
) -> None:
    path = write_toml(tmp_path / "elsewhere.toml", config_dict())
    env = {**os.environ, "CHERT_RELAY_CONFIG": str(path)}
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config"],
        capture_output=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith(f"{path}: ok")
    env["CHERT_RELAY_CONFIG"] = str(tmp_path / "missing.toml")
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config"],
        capture_output=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 78
    assert f"cannot read {tmp_path / 'missing.toml'}".encode() in out.stderr


def test_the_log_format_comes_from_the_environment(tmp_path: Path) -> None:
    """``CHERT_RELAY_LOG_FORMAT`` (the README's command line section) stands in for
    ``--log-format``, as the Dockerfile and compose.yaml use it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = 'nowhere'\n")

    def run(**env: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "relay", "-c", str(bad), "dlq", "list"],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )
        assert out.returncode == 78
        return out.stderr.decode().splitlines()

    (line,) = run(CHERT_RELAY_LOG_FORMAT="json")
    assert json.loads(line)["level"] == "error"
    assert not run(CHERT_RELAY_LOG_FORMAT="text")[0].startswith("{")


@pytest.mark.parametrize("name", ["CHERT_RELAY_LOG_LEVEL", "CHERT_RELAY_LOG_FORMAT"])
def test_a_bad_log_setting_in_the_environment_is_one_line_and_exit_78(name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "-c", str(EXAMPLE)],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, name: "loud"},
    )
    assert out.returncode == 78
    (line,) = out.stderr.decode().splitlines()  # no traceback
    assert f"{name}='loud' is not one of" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a state directory another user owns")
def test_root_starts_no_server_on_the_relays_users_state(tmp_path: Path) -> None:
    """The systemd units run the relay as a dynamic user. An operator's ``dlq`` as root,
    with the relay stopped, would start a redis-server as root in that user's state:
    root's files the relay's own server cannot write, and links the user planted
    followed as root. It is refused, touching nothing; with the relay's server running,
    the command shares it."""
    state = tmp_path / "state"
    ran_before(state)
    nobody = 65534
    for p in [state, *state.rglob("*")]:
        os.chown(p, nobody, nobody)

    def listing() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_uid, p.stat().st_mtime_ns) for p in state.rglob("*")}

    before = listing()
    data = config_dict()
    data["relay"]["state_dir"] = str(state)
    path = write_toml(tmp_path / "relay.toml", data)
    out = cli("--config", str(path), "dlq", "list")
    assert out.returncode == 77, out.stderr
    assert f"the relay's state at {state} belongs to uid {nobody}" in out.stderr.decode()
    assert listing() == before
    out = cli("--config", str(path), "run")  # nor the relay itself, as root
    assert out.returncode == 77, out.stderr
    assert listing() == before
    server = EmbeddedRedis(state / "redis")  # the relay's, running
    asyncio.run(server.start())
    try:
        out = cli("--config", str(path), "dlq", "list")
        assert out.returncode == 0, out.stderr
    finally:
        asyncio.run(server.stop())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_follows_no_link_another_user_made_for_the_data_directory(tmp_path: Path) -> None:
    # The relay's user swaps its data directory for a link to a directory of root's: root's
    # command must not start a server there.
    state, roots = tmp_path / "state", tmp_path / "roots"
    state.mkdir()
    roots.mkdir()
    (state / "redis").symlink_to(roots)
    os.lchown(state / "redis", 65534, 65534)
    data = config_dict()
    data["relay"]["state_dir"] = str(state)
    path = write_toml(tmp_path / "relay.toml", data)
    out = cli("--config", str(path), "dlq", "list")
    assert out.returncode == 77, out.stderr
    assert f"the relay's state at {state / 'redis'} belongs to uid 65534" in out.stderr.decode()
    assert list(roots.iterdir()) == []


def test_a_link_planted_as_the_lock_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "redis").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    (state / "redis" / "redis.lock").symlink_to(target)
    data = config_dict()
    data["relay"]["state_dir"] = str(state)
    data["server"]["listen"] = "127.0.0.1:0"
    path = write_toml(tmp_path / "relay.toml", data)
    out = cli("--config", str(path), "run")
    assert out.returncode == 73, out.stderr
    assert f"cannot open {state / 'redis' / 'redis.lock'}" in out.stderr.decode()
    assert not target.exists()
