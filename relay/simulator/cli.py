"""``chert-relay simulate``: run the Chert stand-in from the command line.

With ``--config relay.toml`` it plays Chert for the relay's own tenants: it signs
webhooks with each tenant's first webhook secret, accepts API calls signed with
each tenant's API signing secret, and pushes to the relay's receiver at
``server.listen``. Without a config it serves one demo tenant (random secrets
unless given). It emits events at ``--rate``, prints a line per event and push
(unless ``--quiet``) and a line of counts every ``--stats-every``, takes faults
from its options and, at run time, from ``PATCH /_sim/faults``. It is a separate
tool, not a role of the daemon, so it installs its own SIGTERM/SIGINT handlers
and exits 0 on either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.commands import Commands
from relay.config import Config, load_config
from relay.config.values import Listen, parse_duration, parse_listen, resolve_secret
from relay.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from relay.signing import standard_webhooks_key
from relay.simulator.generator import EVENT_TYPES
from relay.simulator.models import SimTenant, WebhookAttempt
from relay.simulator.server import Simulator
from relay.simulator.sink import CountingSink

log = logging.getLogger(__name__)

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DEFAULT_LISTEN = "127.0.0.1:8070"
MAX_LOG_ROWS = 100_000  # per tenant, so a long run does not grow without bound


def parse_rate(value: str) -> float:
    """Events per second from ``"2/s"``, ``"30/m"``, ``"100/h"``, ``"0.5"`` or ``"0"``."""
    m = _RATE_RE.match(value)
    if not m:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate; use e.g. 2/s, 30/m, 0")
    return float(m.group(1)) / _PER[m.group(2)]


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a share between 0 and 1")
    return share


def _listen(value: str) -> Listen:
    try:
        listen = parse_listen(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if listen.path is not None:
        raise argparse.ArgumentTypeError("the simulator listens on host:port")
    return listen


def add_simulate_parser(commands: Commands) -> None:
    """Register ``simulate`` on the main parser's commands."""
    s = commands.add(
        "simulate",
        config_help="relay configuration: simulate its tenants and push to its receiver",
        help="run a local Chert stand-in (signed webhooks, events API, SSE, faults)",
        description="A local Chert stand-in: emits events, pushes signed webhooks with "
        "Chert's retry rule, serves /api/v1/events, /events/{id}, /events/{id}/replay and "
        "/events/stream, and takes faults from PATCH /_sim/faults.",
    )
    s.add_argument(
        "--listen",
        type=_listen,
        default=parse_listen(DEFAULT_LISTEN),
        help=f"host:port to serve on (default {DEFAULT_LISTEN})",
    )
    s.add_argument(
        "--rate",
        type=parse_rate,
        default=1.0,
        help="events to emit, e.g. 2/s, 30/m; 0 = only via POST /_sim/emit (default 1/s)",
    )
    s.add_argument(
        "--types",
        default="",
        help=f"comma-separated event types (default: a realistic mix of {', '.join(EVENT_TYPES)})",
    )
    s.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop emitting after this many events (default: no limit)",
    )
    s.add_argument(
        "--tenant",
        action="append",
        default=[],
        help="simulate only this tenant (repeatable); without --config, its slug (default: demo)",
    )
    s.add_argument(
        "--webhook-url",
        help="push webhooks here ({tenant} is replaced); 'none' to push nothing "
        "(default with --config: the relay's receiver at server.listen)",
    )
    s.add_argument(
        "--webhook-secret", help="without --config: webhook secret (value, env:NAME or file:/path)"
    )
    s.add_argument(
        "--api-secret", help="without --config: API signing secret (value, env:NAME or file:/path)"
    )
    s.add_argument(
        "--legacy-signature",
        action="store_true",
        help="sign webhooks in the legacy x-chert-signature format",
    )
    s.add_argument(
        "--stream-lifetime",
        type=_duration,
        default=60.0,
        help="how long an SSE connection lives before 'event: close' (default 60s)",
    )
    s.add_argument(
        "--heartbeat", type=_duration, default=15.0, help="SSE heartbeat interval (default 15s)"
    )
    s.add_argument(
        "--retry-backoff",
        type=_duration,
        default=1.0,
        help="base of the backoff between Chert's 3 webhook attempts (default 1s)",
    )
    s.add_argument(
        "--drop-rate", type=_share, default=0.0, help="share of webhooks silently not sent"
    )
    s.add_argument(
        "--duplicate-rate", type=_share, default=0.0, help="share of webhooks sent twice"
    )
    s.add_argument("--reorder", action="store_true", help="shuffle the order of pushes")
    s.add_argument("--delay", type=_duration, default=0.0, help="wait this long before each push")
    s.add_argument(
        "--no-webhooks",
        action="store_true",
        help="start with webhooks stopped (events are only logged)",
    )
    s.add_argument(
        "--sink",
        type=_listen,
        metavar="HOST:PORT",
        help="also run a small counting sink here (for trying the relay)",
    )
    s.add_argument(
        "--stats-every",
        type=_duration,
        default=10.0,
        help="print counts this often; 0 = never (default 10s)",
    )
    s.add_argument(
        "-q", "--quiet", action="store_true", help="no line per event and push, only the counts"
    )
    s.add_argument("--seed", type=int, help="seed for reproducible events and faults")
    s.set_defaults(func=cmd_simulate)


# --- tenants ------------------------------------------------------------------------


def _receiver_url(config: Config) -> str | None:
    listen = config.server.listen
    if listen.path is not None or listen.port is None:
        return None
    host = listen.host or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{listen.port}/webhooks/chert/{{tenant}}"


def tenants_from_config(
    config: Config, only: list[str], webhook_url: str | None
) -> list[SimTenant]:
    """Simulated tenants for the relay's own; ``webhook_url`` may hold ``{tenant}``."""
    url = webhook_url if webhook_url is not None else _receiver_url(config)
    out = []
    for t in config.tenants:
        if only and t.slug not in only:
            continue
        hook = t.webhook_secrets[0].get() if t.webhook_secrets else None
        api = t.api.signing_secret.get() if t.api.signing_secret else secrets.token_hex(16)
        target = url.replace("{tenant}", t.slug) if url and hook else None
        out.append(
            SimTenant(
                slug=t.slug,
                api_secret=api,
                webhook_secret=hook or secrets.token_hex(32),
                webhook_url=target,
            )
        )
    missing = sorted(set(only) - {t.slug for t in out})
    if missing:
        raise ValueError(f"not in the configuration: {', '.join(missing)}")
    return out


def standalone_tenants(args: argparse.Namespace) -> list[SimTenant]:
    hook = resolve_secret(args.webhook_secret).get() if args.webhook_secret else None
    api = resolve_secret(args.api_secret).get() if args.api_secret else None
    url = args.webhook_url
    return [
        SimTenant(
            slug=slug,
            api_secret=api or secrets.token_hex(16),
            webhook_secret=hook or secrets.token_hex(32),
            webhook_url=url.replace("{tenant}", slug) if url else None,
        )
        for slug in (args.tenant or ["demo"])
    ]


def _sink_keys(config: Config | None, listen: Listen) -> list[bytes]:
    if config is None:
        return []
    keys = []
    for t in config.tenants:
        for s in t.sinks:
            if s.secret is not None and f"//{listen.host}:{listen.port}" in s.url:
                keys.append(standard_webhooks_key(s.secret.get()))
    return keys


# --- running ------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    config: Config | None = None
    config_path = getattr(args, "config", None)
    if config_path:
        # ConfigError: handled by the main CLI. The admin tokens are the relay's business.
        config = load_config(Path(config_path), admin_tokens=False)
    if args.webhook_url is not None and args.webhook_url.lower() == "none":
        args.webhook_url = ""
    try:
        if config is not None:
            tenants = tenants_from_config(config, args.tenant, args.webhook_url)
        else:
            tenants = standalone_tenants(args)
    except ValueError as e:
        print(f"chert-relay simulate: {e}", file=sys.stderr)
        return EXIT_USAGE
    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) or None
    sink = CountingSink(keys=_sink_keys(config, args.sink)) if args.sink else None
    with contextlib.suppress(asyncio.CancelledError):
        return asyncio.run(_run(args, tenants, types, sink))
    return EXIT_OK


class _Printer:
    """Per-event lines and periodic counts, on stdout."""

    def __init__(self, sim: Simulator, sink: CountingSink | None, quiet: bool) -> None:
        self._sim = sim
        self._sink = sink
        self._quiet = quiet

    def emitted(self, row: dict[str, Any]) -> None:
        if not self._quiet:
            tenant = row["payload"].get("partner_id", "?")
            _out(f"emit  {tenant} {row['type']} {row['event_id']} ({row['id']})")

    def attempt(self, a: WebhookAttempt) -> None:
        if self._quiet:
            return
        outcome = str(a.status) if a.status is not None else a.error
        extra = " replay" if a.replay else " copy" if a.copy else ""
        _out(
            f"push  {a.tenant} {a.event_id} attempt {a.attempt}{extra} -> {outcome} "
            f"({a.duration_ms} ms)"
        )

    def counts(self) -> None:
        stats = self._sim.stats()
        events = sum(t["events"] for t in stats["tenants"].values())
        status = {
            s: sum(t[s] for t in stats["tenants"].values())
            for s in ("pending", "delivered", "failed", "dev_inbox")
        }
        wh = stats["webhooks"]
        line = (
            f"counts: events {events} (delivered {status['delivered']}, failed "
            f"{status['failed']}, pending {status['pending']}, dev_inbox {status['dev_inbox']})"
            f" · pushes 2xx {wh['delivered']} 4xx {wh['client_errors']} 5xx "
            f"{wh['server_errors']} errors {wh['connection_errors']} dropped {wh['dropped']}"
            f" · api requests {stats['api']['requests']} · streams {stats['streams']['open']}"
        )
        if self._sink is not None:
            line += (
                f" · sink {self._sink.received} received, {self._sink.unique} distinct, "
                f"{self._sink.repeats} repeats"
            )
            if self._sink.bad_signatures:
                line += f", {self._sink.bad_signatures} bad signatures"
        _out(line)


def _out(line: str) -> None:
    print(time.strftime("%H:%M:%S ") + line, flush=True)


async def _run(
    args: argparse.Namespace,
    tenants: list[SimTenant],
    types: tuple[str, ...] | None,
    sink: CountingSink | None,
) -> int:
    sim = Simulator(
        tenants,
        stream_lifetime=args.stream_lifetime,
        heartbeat_interval=args.heartbeat,
        webhook_retry_backoff=args.retry_backoff,
        seed=args.seed,
        max_log_rows=MAX_LOG_ROWS,
    )
    faults = sim.faults
    faults.legacy_signature = args.legacy_signature
    faults.drop_rate, faults.duplicate_rate = args.drop_rate, args.duplicate_rate
    faults.reorder, faults.delay = args.reorder, args.delay
    faults.webhooks_enabled = not args.no_webhooks
    printer = _Printer(sim, sink, args.quiet)
    sim.emit_listeners.append(printer.emitted)
    sim.attempt_listeners.append(printer.attempt)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    sink_runner: web.AppRunner | None = None
    try:
        await sim.start(host=args.listen.host, port=args.listen.port)
        if sink is not None:
            sink_runner = web.AppRunner(sink.app(), handle_signals=False, access_log=None)
            await sink_runner.setup()
            await web.TCPSite(sink_runner, args.sink.host, args.sink.port).start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        await sim.stop()
        if sink_runner is not None:
            await sink_runner.cleanup()
        return EXIT_FAILURE

    _out(
        f"simulator ready: events API {sim.base_url} · control {sim.url}/_sim/faults, "
        f"/_sim/emit, /_sim/stats"
    )
    for t in tenants:
        _out(f"tenant {t.slug}: webhooks -> {t.webhook_url or 'none (rows are dev_inbox)'}")
    if sink is not None:
        _out(f"sink listening on http://{args.sink.host}:{args.sink.port}/")

    tasks = [asyncio.create_task(_emit_loop(sim, args.rate, args.count, types, stop))]
    if args.stats_every > 0:
        tasks.append(asyncio.create_task(_stats_loop(printer, args.stats_every)))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        printer.counts()
        await sim.stop()
        if sink_runner is not None:
            await sink_runner.cleanup()
    _out("simulator stopped")
    return EXIT_OK


async def _emit_loop(
    sim: Simulator, rate: float, count: int, types: tuple[str, ...] | None, stop: asyncio.Event
) -> None:
    if rate <= 0:
        return
    slugs = list(sim.tenants)
    loop = asyncio.get_running_loop()
    started = loop.time()
    n = 0
    while not stop.is_set() and (count <= 0 or n < count):
        sim.emit_random(slugs[n % len(slugs)], types)
        n += 1
        await asyncio.sleep(max(0.0, started + n / rate - loop.time()))
    if count > 0:
        _out(f"emitted {n} event(s); still serving (stop with Ctrl-C)")


async def _stats_loop(printer: _Printer, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        printer.counts()
