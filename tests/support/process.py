"""Running ``chert-relay`` as a real subprocess in tests (signals, exit codes, logs)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp

from relay.store.embedded import free_port


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(type(v))


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a config dict (as tests/conftest.config_dict makes) as TOML."""
    lines: list[str] = []
    for section, values in data.items():
        if section == "tenants":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for tenant in data.get("tenants", []):
        lines.append("[[tenants]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in tenant.items() if k != "sinks"]
        for sink in tenant.get("sinks", []):
            lines.append("[[tenants.sinks]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in sink.items()]
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # fail here, not in the relay, if this writer is wrong
    return path


class RelayProcess:
    """``python -m relay --config FILE <command>`` with its log in a file."""

    def __init__(
        self,
        config_path: Path,
        command: str = "serve",
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.env = env or {}  # added to this process's environment
        self.log_path = config_path.with_suffix(f".{command}.log")
        self.argv = [
            sys.executable,
            "-m",
            "relay",
            "--log-format",
            "text",
            "--config",
            str(config_path),
            command,
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=env)
        log.close()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        return self.proc.returncode

    async def wait_ready(self, admin_url: str, timeout: float = 30.0) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log}")
                try:
                    async with session.get(f"{admin_url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def listen_ports() -> tuple[int, int]:
    return free_port(), free_port()
