"""``GET /api/pollers``: what each polled tenant's poller is doing, for operators."""

from __future__ import annotations

from typing import Any

import aiohttp
from redis.asyncio import Redis

from relay.config import Config
from relay.config.values import resolve_secret
from relay.service import Service
from relay.upstream.poller import Poller
from tests.support.common import TENANT, wait_for
from tests.support.upstream import relay_config, running_relay, simulator, wait_enqueued

TOKEN = "admin-token-for-poller-status-0123"
ROLES = ("receiver", "poller", "admin")


def with_token(config: Config) -> Config:
    admin = config.admin.model_copy(update={"token": resolve_secret(TOKEN)})
    return config.model_copy(update={"admin": admin})


async def pollers(service: Service, token: str = TOKEN) -> tuple[int, Any]:
    role: Any = service.roles["admin"]
    host, port = role.addresses[0][:2]
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://{host}:{port}/api/pollers", headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        return resp.status, await resp.json()


def windows(service: Service) -> int:
    poller = service.roles["poller"]
    assert isinstance(poller, Poller)
    return poller.tenants[TENANT].windows


async def test_status_shows_the_poller_at_work(redis_url: str, redis: Redis) -> None:
    async with simulator() as sim:
        config = with_token(relay_config(redis_url, sim.base_url, "always"))
        async with running_relay(config, ROLES) as service:
            assert (await pollers(service, token="wrong"))[0] == 401
            rows = sim.emit(TENANT, count=3)
            await wait_enqueued(redis, rows)
            await wait_for(lambda: windows(service) >= 1)
            status, body = await pollers(service)
    assert status == 200
    # other-1 is not polled (mode off): not listed.
    assert [t["tenant"] for t in body["tenants"]] == [TENANT]
    entry = body["tenants"][0]
    assert entry["configured_mode"] == "always"
    assert entry["polled_here"] is True
    assert entry["lease_held"] is True
    assert entry["mode"] == "always"
    assert entry["windows"] >= 1
    assert entry["last_outcome"] == "ok"
    assert entry["last_error"] is None
    assert entry["watermark"] is not None
    assert entry["watermark_age_seconds"] >= 0
    assert entry["last_webhook"] is None  # everything came by polling


async def test_status_shows_why_polling_fails(redis_url: str) -> None:
    async with simulator() as sim:
        wrong = relay_config(redis_url, sim.base_url, "always", api={"signing_secret": "e" * 32})
        async with running_relay(with_token(wrong), ROLES) as service:

            async def failed() -> bool:
                _, body = await pollers(service)
                return body["tenants"][0].get("last_outcome") == "auth_error"

            await wait_for(failed)
            _, body = await pollers(service)
    entry = body["tenants"][0]
    assert "2004" in entry["last_error"]
    assert "e" * 32 not in entry["last_error"]
    assert entry["last_error_at"] is not None
