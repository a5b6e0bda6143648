"""The daemon's process tunes Python's cyclic collector once it has started."""

from __future__ import annotations

import asyncio
import gc

from relay.config import parse_config
from relay.service import GC_GEN0, Service
from tests.support.common import config_dict


async def test_a_served_process_freezes_start_up_objects_and_collects_young_less_often(
    redis_url: str,
) -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    config = parse_config(config_dict(redis_url=redis_url), env={})
    plain = Service(config, roles=("receiver", "admin"))
    assert not plain.tune_gc  # only serve(), the daemon's own entry, tunes the process
    service = Service(config, roles=("receiver", "admin"))
    service.tune_gc = True
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.started.wait(), 30)
        assert gc.get_threshold() == (GC_GEN0, *before[1:])
        assert gc.get_freeze_count() > frozen
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)
        gc.unfreeze()
        gc.set_threshold(*before)
