"""The daemon's lifecycle: start-up order, signals, and shutdown order.

Only this module installs signal handlers (SIGTERM/SIGINT: shut down, SIGHUP:
reload the configuration). Every resource's set-up is paired with its tear-down on
one ``AsyncExitStack``, and the roles run under one ``TaskGroup`` so that a role
that crashes stops the process instead of leaving a half-alive daemon.

Start-up order: the tracer, with ``[telemetry] tracing`` on (:mod:`relay.telemetry`) →
Redis (the embedded server, if no URL is set), waiting up to
``redis.startup_wait`` for it to answer and checking that it cannot lose events →
the roles, each listener bound → systemd is told ``READY=1`` (:mod:`relay.systemd`).
A start-up failure raises an error that names its cause and carries its exit code
(:mod:`relay.errors`); roles already started are stopped first.

Shutdown order: stop taking webhooks (the receiver answers 503 and closes its
listener) → let in-flight ingests finish → stop the poller → stop picking jobs and
let running deliveries finish (bounded) → stop the admin listener → close Redis →
stop the embedded redis-server → export the spans still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Literal

from relay import descriptors, memory, telemetry
from relay.admin.role import AdminRole
from relay.config import Config, load_config
from relay.config.values import Listen
from relay.edge.role import ReceiverRole
from relay.errors import ConfigError, ListenError
from relay.ingest.ingestor import Ingestor
from relay.keys import Keys
from relay.metrics import Metrics
from relay.runtime import Role, Runtime, Staged
from relay.store import clock
from relay.store.client import wait_for_redis
from relay.store.endpoint import open_client
from relay.systemd import Notifier
from relay.upstream.collector import TenantStateCollector
from relay.upstream.poller import Poller

log = logging.getLogger(__name__)

# The roles, in the order they are stopped in; they start in the reverse order. The
# admin listener stops last, so that /readyz says "draining" until the end.
STOP_ORDER = ("receiver", "poller", "worker", "admin")
RoleFactory = Callable[[Runtime], Role]
STATUS_ORDER = ("receiver", "worker", "poller", "admin")  # the roles' parts of STATUS=
STATUS_EVERY_S = 10.0  # how often systemd's STATUS= line is refreshed


class Service:
    """Runs the chosen roles until SIGTERM/SIGINT (or :meth:`request_stop`)."""

    def __init__(
        self,
        config: Config,
        *,
        roles: tuple[str, ...] = ("receiver", "admin"),
        config_path: Path | None = None,
        extra_roles: dict[str, RoleFactory] | None = None,
        admin_listen: Listen | Literal["config"] | None = "config",
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.tune_gc = False  # the daemon's own process (serve()) tunes the collector
        self.wanted = roles
        self.extra_roles = extra_roles or {}
        # Where this process's admin listener goes (None: nowhere). The CLI picks
        # admin.listen or admin.worker_listen by command, or --admin-listen.
        self.admin_listen = config.admin.listen if admin_listen == "config" else admin_listen
        self.notifier = notifier or Notifier({})
        self.roles: dict[str, Role] = {}
        self.runtime: Runtime | None = None
        self._tenant_state: TenantStateCollector | None = None
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("shutting down")
            self.notifier.stopping()
            self._stop.set()

    def reload(self) -> None:
        """Re-read the configuration file; keep the old one if the new one is invalid."""
        if self.config_path is None:
            return
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("configuration not reloaded: %s", e)
            return
        config = self._keep_restart_only(config)
        self.config = config
        if self.runtime is not None:
            self.runtime.config = config
            self.runtime.ingestor.set_config(config)
        if self._tenant_state is not None:
            self._tenant_state.config = config
        for role in self.roles.values():
            role.reload(config)
        log.info("configuration reloaded from %s", self.config_path)

    def _keep_restart_only(self, config: Config) -> Config:
        """``config`` with the running values of what only a restart applies — ``[redis]``
        (where every key lives: a new ``key_prefix`` taken by some parts and not others
        would queue events no worker reads), ``[telemetry]`` and ``relay.state_dir`` —
        and a warning naming what waits for the restart."""
        old = self.config
        kept: dict[str, object] = {}
        if config.redis != old.redis:
            kept["redis"] = old.redis
        if config.telemetry != old.telemetry:
            kept["telemetry"] = old.telemetry
        if config.relay.state_dir != old.relay.state_dir:
            kept["relay"] = config.relay.model_copy(update={"state_dir": old.relay.state_dir})
        if not kept:
            return config
        log.warning(
            "configuration: changes to %s need a restart; until then the running values "
            "stay, and the rest applies now",
            ", ".join("relay.state_dir" if k == "relay" else f"[{k}]" for k in kept),
        )
        return config.model_copy(update=kept)

    def _install_signals(self, stack: AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
            stack.callback(loop.remove_signal_handler, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        stack.callback(loop.remove_signal_handler, signal.SIGHUP)

    async def run(self) -> None:
        """Start, serve until asked to stop, shut down in order. Raises on start-up faults."""
        async with AsyncExitStack() as stack:
            self._install_signals(stack)
            stack.callback(self.notifier.close)
            if self.config.telemetry.tracing:
                # stopped last: the spans of the shutdown itself are exported too
                stack.push_async_callback(telemetry.start())
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(descriptors.LoopErrors())
            stack.callback(loop.set_exception_handler, None)
            memory.keep_large_blocks_returnable()
            short = descriptors.raise_open_files(descriptors.needed(self.config, self.wanted))
            if short is not None:
                log.warning("%s", short)
            endpoint, client = await open_client(self.config, stack)
            r = self.config.redis
            for warning in await wait_for_redis(
                client,
                endpoint.describe(),
                within=r.startup_wait,
                require_aof=r.require_aof,
                min_replica_acks=r.min_replica_acks,
                log_bytes=self.config.event_log.max_memory if self.config.event_log.enabled else 0,
            ):
                log.warning("%s", warning)
            log.info("using Redis at %s", endpoint.describe())
            metrics = Metrics()
            metrics.redis_up.set(1)
            clock.CLOCK.on_change = metrics.clock_offset.set
            ingestor = Ingestor(client, self.config, metrics)
            self.runtime = rt = Runtime(
                config=self.config,
                redis=client,
                metrics=metrics,
                ingestor=ingestor,
                keys=Keys(self.config.redis.key_prefix),
                endpoint=endpoint,
            )
            if {"receiver", "poller"} & set(self.wanted):
                # Last webhook and watermark, from Redis: the same in every such process.
                self._tenant_state = TenantStateCollector(endpoint.sync_client(), self.config)
                metrics.registry.register(self._tenant_state)
                stack.callback(self._tenant_state.close)
            for warning in self.config.warnings():
                log.warning("config: %s", warning)
            try:
                await self._start_roles(rt)
            except BaseException:
                await self._stop_roles()
                raise
            for staged in self._staged():
                staged.ready()
            if self.tune_gc:
                tune_gc()
            self.started.set()
            self.notifier.ready(self.status())
            try:
                async with asyncio.TaskGroup() as tg:
                    for role in self.roles.values():
                        tg.create_task(role.run(), name=role.name)
                    helpers = [
                        tg.create_task(
                            endpoint.watch_primary(self._primary_changed), name="primary"
                        ),
                        tg.create_task(clock.watch(client), name="clock"),
                    ]
                    if self.notifier.enabled:
                        helpers.append(tg.create_task(self.notifier.watchdog(), name="watchdog"))
                        helpers.append(tg.create_task(self._report_status(), name="status"))
                    tg.create_task(self._stop_when_asked(rt, helpers))
            finally:
                await self._stop_roles()
                await rt.ingestor.drain()  # and give its Redis connection back
            log.info("stopped")

    def _factories(self) -> dict[str, RoleFactory]:
        """What builds each role this process may run, by name: the receiver and the
        admin listener here (none without an admin address), the others as the CLI
        passes them (so their stages load only in the processes that run them)."""
        factories: dict[str, RoleFactory] = {"receiver": ReceiverRole, **self.extra_roles}
        listen = self.admin_listen
        if listen is not None:
            factories["admin"] = lambda rt: AdminRole(rt, self._poller, listen)
        return factories

    def _staged(self) -> list[Staged]:
        return [role for role in self.roles.values() if isinstance(role, Staged)]

    async def _start_roles(self, rt: Runtime) -> None:
        factories = self._factories()
        for name in reversed(STOP_ORDER):
            factory = factories.get(name)
            if name not in self.wanted or factory is None:
                continue
            role = self.roles[name] = factory(rt)  # stopped again if a later one fails
            try:
                await role.start()
            except OSError as e:
                listen = getattr(role, "listen", None)
                if listen is None:
                    raise
                raise ListenError(name, str(listen), e) from None

    def _primary_changed(self, old: str | None, new: str) -> None:
        if old is None:
            log.info("the Redis primary is %s", new)
            return
        log.warning("the Redis primary is now %s (was %s): a failover", new, old)
        if self.runtime is not None:
            self.runtime.metrics.redis_primary_changes.inc()

    def status(self) -> str:
        """One line on what this process is doing, for systemd's ``STATUS=``: webhooks,
        deliveries, then polling (the README's example), whatever order they started in."""
        parts = []
        for name in STATUS_ORDER:
            line = getattr(self.roles.get(name), "status", None)
            if line is not None:
                parts.append(line())
        return "; ".join(p for p in parts if p) or "starting"

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            self.notifier.status(self.status())

    def _poller(self) -> Poller | None:
        role = self.roles.get("poller")
        return role if isinstance(role, Poller) else None

    async def _stop_when_asked(self, rt: Runtime, helpers: list[asyncio.Task[None]]) -> None:
        await self._stop.wait()
        rt.metrics.draining.set(1)
        for staged in self._staged():
            staged.drain()
        await self._stop_roles()
        for task in helpers:  # the watchdog pings until the roles have stopped
            task.cancel()

    async def _stop_roles(self) -> None:
        for name in STOP_ORDER:
            role = self.roles.pop(name, None)
            if role is None:
                continue
            try:
                await role.stop()
            except Exception:
                log.exception("error while stopping %s", name)


GC_GEN0 = 20_000  # allocations between young collections (CPython's default: 700)


def tune_gc() -> None:
    """Once started: the long-lived objects of start-up (modules, configuration,
    scripts) leave the cyclic collector's view (``gc.freeze``), and young collections
    run every :data:`GC_GEN0` allocations rather than 700. A delivery or a webhook
    allocates a few hundred short-lived objects, almost none in cycles; at the defaults
    the collector took 15-20% of the worker's CPU (bench/README.md, "Delivery
    throughput"). Memory stays bounded: a young generation holds at most that many
    objects."""
    gc.collect()  # start-up's garbage first: frozen, it would stay
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


def serve(service: Service) -> None:
    """Run ``service`` on a fresh event loop until it stops."""
    service.tune_gc = True
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(service.run())
