"""What the suite runs against: a redis-server, ``chert-relay serve`` on it, and a bare
aiohttp application with one route (``bench/bare.py``) — all real processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis

from relay.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent.parent

TENANT, OTHER = "acme-7a3f", "other-1"
SECRET = "7f3c1e9a5b2d4f6081a3c5e7f9b1d3e5a7c9e1f3b5d7f9a1c3e5b7d9f1a3c5e7"
OTHER_SECRET = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
ADMIN_TOKEN = "adm-5c9e2f7a1b3d4e6f8a0b2c4d6e8f0a1b"
SINK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Limits:
    """The relay's settings the cases and scenarios are built against."""

    max_body: int = 65_536
    tolerance: int = 300
    body_timeout: float = 2.0
    keepalive_timeout: float = 3.0
    max_connections: int = 256


def _config(receiver: int, admin: int, redis_url: str, state: Path, limits: Limits) -> str:
    sink = f'name = "all"\nurl = "http://127.0.0.1:9/all"\nsecret = "{SINK_SECRET}"'
    return f"""
[server]
listen = "127.0.0.1:{receiver}"
max_body_bytes = {limits.max_body}
body_timeout = {limits.body_timeout}
keepalive_timeout = {limits.keepalive_timeout}
max_connections = {limits.max_connections}

[admin]
listen = "127.0.0.1:{admin}"
allowed_hosts = ["admin", "sentinel"]  # the names the cases send; others: DNS rebinding
worker_listen = "127.0.0.1:0"
token = "env:HOSTILE_ADMIN_TOKEN"

[redis]
url = "{redis_url}"

[relay]
state_dir = "{state}"

[[tenants]]
slug = "{TENANT}"
webhook_secrets = ["env:HOSTILE_SECRET"]
signature_tolerance = {limits.tolerance}
poll = {{ mode = "off" }}
[[tenants.sinks]]
{sink}

[[tenants]]
slug = "{OTHER}"
webhook_secrets = ["env:HOSTILE_OTHER_SECRET"]
accept_compressed = true
poll = {{ mode = "off" }}
[[tenants.sinks]]
{sink}
"""


class Target:
    """The processes, started in ``directory``; ``stop()`` ends them."""

    def __init__(self, directory: Path, limits: Limits) -> None:
        self.directory = directory
        self.limits = limits
        self.redis_server = EmbeddedRedis(
            directory / "redis", port=free_port(), appendfsync="everysec"
        )
        self.receiver = ("127.0.0.1", free_port())
        self.admin = ("127.0.0.1", free_port())
        self.bare = ("127.0.0.1", free_port())
        self.relay: subprocess.Popen[bytes] | None = None
        self.bare_proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "relay.log"
        self.redis: redis.Redis | None = None

    def start(self) -> None:
        url = asyncio.run(self.redis_server.start())
        self.redis = redis.Redis.from_url(url)
        config = self.directory / "relay.toml"
        config.write_text(
            _config(self.receiver[1], self.admin[1], url, self.directory / "state", self.limits)
        )
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HOSTILE_ADMIN_TOKEN": ADMIN_TOKEN,
            "HOSTILE_SECRET": SECRET,
            "HOSTILE_OTHER_SECRET": OTHER_SECRET,
        }
        bare_log = self.directory / "bare.log"
        with self.log_path.open("ab") as log, bare_log.open("ab") as bare:
            self.relay = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "--log-format",
                    "json",
                    "--config",
                    str(config),
                    "serve",
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
            )
            self.bare_proc = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "bare.py"), str(self.bare[1])],
                stdout=bare,
                stderr=bare,
                env=env,
                cwd=ROOT,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.admin[0]}:{self.admin[1]}/readyz"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the relay exited at start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200 and _listening(self.bare):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the relay did not become ready:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.relay is not None and self.relay.poll() is None

    def rss_kib(self) -> int:
        """The relay process' resident memory."""
        assert self.relay is not None
        for line in Path(f"/proc/{self.relay.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_summary(self, since: int) -> Counter[str]:
        """Lines the relay logged after byte ``since``, by level, logger and message
        start (what a flood would look like)."""
        out: Counter[str] = Counter()
        with self.log_path.open("rb") as f:
            f.seek(since)
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    out["(not JSON) " + line[:60].decode(errors="replace").strip()] += 1
                    continue
                words = " ".join(str(rec.get("msg", "")).split()[:3])
                out[f"{rec.get('level')} {rec.get('logger')}: {words}"] += 1
        return out

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def dbsize(self) -> int:
        assert self.redis is not None
        size: int = self.redis.dbsize()  # type: ignore[assignment] # the sync client
        return size

    def stop(self) -> None:
        for proc in (self.relay, self.bare_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.redis is not None:
            self.redis.close()
        asyncio.run(self.redis_server.stop())


def _listening(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False
