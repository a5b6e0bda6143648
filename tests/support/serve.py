"""``chert-relay serve`` as a real process on a free port, with settings of a test's
choosing and, if asked, open-file limits: its log, its ports, a webhook and a metric."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from relay.store.embedded import free_port
from tests.support.common import TENANT, config_dict, envelope, metric_sample, signed, wait_for
from tests.support.process import write_toml


class Serve:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, listen: int, admin: int) -> None:
        self.proc, self.log_path, self.listen, self.admin = proc, log, listen, admin

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin}{path}"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status, await r.text()

    async def refusals(self, reason: str) -> float:
        """A count from /metrics, once the listener has room to answer it."""
        text = await wait_for(self._metrics, 15)
        return metric_sample(text, "chert_relay_admin_refusals_total", reason=reason)

    async def _metrics(self) -> str | None:
        status, text = await self.get("/metrics")
        return text if status == 200 else None

    async def webhook(self, event_id: str) -> int:
        raw, headers = signed(envelope(event_id))
        url = f"http://127.0.0.1:{self.listen}/webhooks/chert/{TENANT}"
        async with aiohttp.ClientSession() as s, s.post(url, data=raw, headers=headers) as r:
            return r.status


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path,
    redis_url: str,
    admin: dict[str, Any],
    nofile: int | tuple[int, int] | None = None,
    server: dict[str, Any] | None = None,
) -> AsyncIterator[Serve]:
    """A real ``serve`` process with ``admin`` (and ``server``) settings, under the
    open-file limit ``nofile`` (soft and hard, or both the same) if given."""
    listen, admin_port = free_port(), free_port()
    data = config_dict(redis_url=redis_url)
    data["server"].update(server or {})
    data["server"]["listen"] = f"127.0.0.1:{listen}"
    data["admin"] = {"listen": f"127.0.0.1:{admin_port}", "worker_listen": "127.0.0.1:0", **admin}
    config = write_toml(tmp_path / "relay.toml", data)
    log_path = tmp_path / "serve.log"

    limit = (nofile, nofile) if isinstance(nofile, int) else nofile

    def cap() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)

    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "--log-format", "text", "-c", str(config), "serve"],
            stdout=out, stderr=out, preexec_fn=cap, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    s = Serve(proc, log_path, listen, admin_port)
    try:
        await wait_for(lambda: "receiver listening" in s.log or proc.poll() is not None, 30)
        assert proc.poll() is None, s.log
        yield s
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
