"""What the roles of a running relay share, and the shape every role has.

The service builds one :class:`Runtime` at start-up and passes it to each role
explicitly; nothing is looked up from globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from redis.asyncio import Redis

from relay.config import Config
from relay.keys import Keys
from relay.metrics import Metrics
from relay.store.endpoint import Endpoint

if TYPE_CHECKING:
    # The service builds the ingestor; the roles that use it (edge, upstream) import
    # relay.ingest themselves. Imported at run time, every role that takes a Runtime
    # (the worker's too) would load the ingest stage.
    from relay.ingest.ingestor import Ingestor


@dataclass
class Runtime:
    config: Config
    redis: Redis
    metrics: Metrics
    ingestor: Ingestor
    keys: Keys
    endpoint: Endpoint = field(default_factory=Endpoint)


class Role(Protocol):
    """One part of the daemon (receiver, admin, worker, poller).

    ``start`` makes it ready to work (binds its listener, say); raising from it stops
    the start-up. ``run`` does the role's work until ``stop`` is called, then returns;
    raising from ``run`` stops the whole process. ``stop`` is graceful and bounded.
    ``reload`` takes a new configuration without a restart (SIGHUP).
    """

    name: str

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    def reload(self, config: Config) -> None: ...


@runtime_checkable
class Staged(Protocol):
    """A role that is told how the whole process stands, beyond its own start and stop.

    ``ready``: every role has started (the admin's ``/readyz`` stops saying
    ``starting``). ``drain``: the process is shutting down, before any role stops (it
    says ``draining``). The service calls them on the roles that have them.
    """

    def ready(self) -> None: ...

    def drain(self) -> None: ...
