"""What the operator page reads about tenants, sinks and the queue: the poll lease seen
from the process that holds it and from one that does not, and the per-sink split of
the queue and of dead letters."""

from __future__ import annotations

from redis.asyncio import Redis

from relay.admin.ui import views
from relay.admin.ui.overview import read_overview
from relay.delivery import breaker
from relay.keys import Keys
from relay.store.sinks import SinkSwitch
from relay.upstream.poller import Poller
from tests.support.common import TENANT, wait_for
from tests.support.deadletters import OTHER, make_dead_letters, two_tenants
from tests.support.delivery import Sink, event, runtime, sinks
from tests.support.upstream import relay_config, running_relay, simulator


async def test_the_lease_is_held_here_elsewhere_or_by_nobody(redis: Redis, redis_url: str) -> None:
    async with simulator() as sim:
        config = relay_config(redis_url, sim.base_url, "always")
        async with running_relay(config, ("poller",)) as service:
            poller = service.roles["poller"]
            assert isinstance(poller, Poller)
            await wait_for(lambda: poller.tenants[TENANT].windows >= 1)
            here = await read_overview(redis, config, poller, [TENANT, "other-1"])
            there = await read_overview(redis, config, None, [TENANT])
        after = await read_overview(redis, config, None, [TENANT])
    polled = here.tenants[0]
    assert (polled.slug, polled.lease, polled.mode, polled.configured_mode) == (
        TENANT,
        "here",
        "always",
        "always",
    )
    assert polled.watermark is not None
    assert here.tenants[1].configured_mode == "off"
    assert (there.tenants[0].lease, there.tenants[0].mode) == ("elsewhere", None)
    assert after.tenants[0].lease == "nobody"  # released at shutdown


async def test_queue_and_dead_letters_are_split_per_sink(redis: Redis, redis_url: str) -> None:
    async with sinks(Sink(lambda s, r: (400, {}))) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await make_dead_letters(redis, config, {TENANT: [("d1", "message.received")]})
    rt = runtime(redis, config)
    await rt.ingestor.ingest(OTHER, event("q1"), "webhook")  # queued, no worker
    await rt.ingestor.ingest(OTHER, event("q2"), "webhook")
    o = await read_overview(redis, config, None, [TENANT, OTHER])
    assert o.queue is not None
    assert (o.queue.ready, o.queue.scheduled, o.queue.split) == (2, 0, True)
    by_sink = {(s.tenant, s.name): s for s in o.sinks}
    assert (by_sink[(OTHER, "s")].ready, by_sink[(OTHER, "s")].scheduled) == (2, 0)
    assert (by_sink[(TENANT, "crm")].ready, by_sink[(TENANT, "crm")].in_flight) == (0, 0)
    assert by_sink[(TENANT, "crm")].dead_letters == {"rejected": 1, "exhausted": 0, "gone": 0}
    assert by_sink[(TENANT, "all")].dead_letters == {"rejected": 1, "exhausted": 0, "gone": 0}
    assert by_sink[(TENANT, "crm")].breaker == breaker.CLOSED
    acme = next(t for t in o.tenants if t.slug == TENANT)
    assert acme.dead_letters["rejected"] == 2
    assert acme.last_webhook is not None
    only_other = await read_overview(redis, config, None, [OTHER])
    assert [t.slug for t in only_other.tenants] == [OTHER]
    assert {s.tenant for s in only_other.sinks} == {OTHER}


async def test_a_sink_marked_gone_shows_gone_not_a_closed_breaker(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda s, r: (410, {}))) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await make_dead_letters(redis, config, {TENANT: [("d1", "message.received")]})
    o = await read_overview(redis, config, None, [TENANT, OTHER])
    by_sink = {(s.tenant, s.name): s for s in o.sinks}
    assert by_sink[(TENANT, "crm")].gone
    assert by_sink[(TENANT, "crm")].breaker == breaker.CLOSED  # 410 is not a failure
    assert not by_sink[(OTHER, "s")].gone  # same URL, but it never answered 410
    html = str(views.overview(o))
    crm_row = next(row for row in html.split("<tr>") if "<code>crm</code>" in row)
    assert '<span class="bad"' in crm_row
    assert "gone (410)" in crm_row
    assert "closed" not in crm_row
    other_row = next(row for row in html.split("<tr>") if "<code>s</code>" in row)
    assert '<span class="ok">breaker closed</span>' in other_row
    # A new URL for the sink is not gone: the mark names the URL that answered 410.
    moved = two_tenants(redis_url, sink.url + "/v2")
    o = await read_overview(redis, moved, None, [TENANT])
    assert not any(s.gone for s in o.sinks)


async def test_a_paused_sink_shows_paused_with_a_resume_button_for_a_replay_session(
    redis: Redis, redis_url: str
) -> None:
    async with sinks(Sink(lambda s, r: (410, {}))) as (sink,):
        config = two_tenants(redis_url, sink.url)
        await make_dead_letters(redis, config, {TENANT: [("d1", "message.received")]})
    switch = SinkSwitch(redis, Keys(config.redis.key_prefix))
    await switch.pause(TENANT, "crm")  # gone and paused
    await switch.pause(OTHER, "s")
    o = await read_overview(redis, config, None, [TENANT, OTHER])
    by_sink = {(s.tenant, s.name): s for s in o.sinks}
    assert by_sink[(TENANT, "crm")].paused_since is not None
    assert by_sink[(TENANT, "all")].paused_since is None

    def row(html: str, sink: str) -> str:
        return next(r for r in html.split("<tr>") if f"<code>{sink}</code>" in r)

    html = str(views.overview(o, csrf="tok", can_change=True))
    assert "paused</span>" in row(html, "crm")
    assert "gone (410)" in row(html, "crm")
    assert "paused</span>" in row(html, "s")
    assert "breaker closed" in row(html, "s")
    assert "paused</span>" not in row(html, "all")
    assert 'action="/ui/sinks/resume"' in row(html, "s")
    assert 'action="/ui/sinks/pause"' in row(html, "all")
    assert 'action="/ui/sinks/test"' in row(html, "all")
    read_only = str(views.overview(o))
    assert "/ui/sinks/" not in read_only
    assert "paused</span>" in row(read_only, "s")
