"""The ``chert-relay`` command line.

A failure to start prints one line naming its cause and exits with its own code
(:mod:`relay.errors`, the README's table): 0 ok · 1 unexpected failure (a bug, with its
traceback) · 2 usage · 69 Redis unreachable, or the embedded redis-server would not
start · 71 a listen address unusable · 72 redis-server not installed · 73 state_dir
not writable · 75 a listen address in use · 77 a listen address not permitted · 78 an
invalid configuration, or a Redis whose settings could lose events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

from relay import __version__, logs
from relay.commands import Commands
from relay.config import Config, config_path, load_config
from relay.config.values import Listen, parse_listen, resolve_secret
from relay.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    RelayError,
    UnsafeRedisError,
)
from relay.ingest.envelope import BadEventError, from_body
from relay.service import RoleFactory, Service, serve
from relay.signing import webhook_headers
from relay.systemd import Notifier

log = logging.getLogger("relay")


def _config_path(args: argparse.Namespace) -> Path:
    return config_path(getattr(args, "config", None))


def _load(args: argparse.Namespace, *, admin_tokens: bool = False) -> Config:
    # Only the processes that serve the admin listener use the admin tokens: the other
    # commands must not need them in the operator's shell (load_config).
    return load_config(_config_path(args), admin_tokens=admin_tokens)


def _load_for_redis(args: argparse.Namespace) -> Config:
    # dlq, events and sinks only read and change the relay's Redis: the operator's shell
    # need not hold the service's other secrets either (systemd's EnvironmentFile).
    return load_config(_config_path(args), admin_tokens=False, redis_only=True)


def role_factories() -> dict[str, RoleFactory]:
    """Roles beyond the receiver and admin, by name."""
    factories: dict[str, RoleFactory] = {}
    from relay.upstream.poller import make_poller

    factories["poller"] = make_poller
    from relay.delivery.role import factory as make_worker

    factories["worker"] = make_worker
    return factories


def _run_service(args: argparse.Namespace, roles: tuple[str, ...]) -> int:
    notifier = Notifier()  # before anything starts a child process
    config = _load(args, admin_tokens=True)
    admin: Listen | None
    if args.admin_listen == "off":
        admin = None
    elif args.admin_listen is not None:
        admin = args.admin_listen
    else:
        admin = config.admin.listen if "receiver" in roles else config.admin.worker_listen
    service = Service(
        config,
        roles=roles,
        config_path=_config_path(args),
        extra_roles=role_factories(),
        admin_listen=admin,
        notifier=notifier,
    )
    serve(service)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    return _run_service(args, ("receiver", "admin", "poller"))


def cmd_run(args: argparse.Namespace) -> int:
    return _run_service(args, ("receiver", "admin", "poller", "worker"))


def cmd_worker(args: argparse.Namespace) -> int:
    return _run_service(args, ("admin", "worker"))


def _admin_listen(value: str) -> Listen | str:
    if value == "off":
        return value
    try:
        return parse_listen(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    kinds = Counter(s.kind for t in config.tenants for s in t.sinks)
    sinks = sum(kinds.values())
    of_kind = ", ".join(f"{n} {k}" for k, n in kinds.items())
    of_kind = "" if set(kinds) == {"http"} else f": {of_kind}"
    print(f"{path}: ok ({len(config.tenants)} tenant(s), {sinks} sink(s){of_kind})")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    body = sys.stdin.buffer.read()
    if args.secret:
        try:
            secret = resolve_secret(args.secret).get()
        except ValueError as e:
            print(f"chert-relay sign: --secret: {e}", file=sys.stderr)
            return EXIT_USAGE
    else:
        tenant = _load(args).tenant(args.tenant)
        if tenant is None or not tenant.webhook_secrets:
            print(
                f"chert-relay sign: tenant {args.tenant!r} has no webhook secret in the "
                "configuration; pass --secret",
                file=sys.stderr,
            )
            return EXIT_USAGE
        secret = tenant.webhook_secrets[0].get()
    headers = {"Content-Type": "application/json"}
    try:
        event = from_body(body)
        headers["X-Webhook-Event"] = event.type
        headers["X-Webhook-Event-Id"] = event.event_id
    except BadEventError as e:
        print(f"chert-relay sign: note: {e}; signing the body as it is", file=sys.stderr)
    headers.update(webhook_headers(secret, body, timestamp=args.timestamp, legacy=args.legacy))
    if args.curl:
        url = args.curl.rstrip("/")
        if "/webhooks/" not in url:
            url = f"{url}/webhooks/chert/{args.tenant}"
        parts = ["curl", "-sS", "-X", "POST", url]
        for k, v in headers.items():
            parts += ["-H", f"{k}: {v}"]
        parts += ["--data-binary", "@-"]
        print(shlex.join(parts))
    elif args.json:
        print(json.dumps(headers, indent=2))
    else:
        for k, v in headers.items():
            print(f"{k}: {v}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chert-relay",
        description="Webhook relay and event-ingestion daemon for the Chert Messaging API.",
    )
    p.add_argument("--version", action="version", version=f"chert-relay {__version__}")
    p.add_argument(
        "-c",
        "--config",
        help="configuration file (default: $CHERT_RELAY_CONFIG or /etc/chert-relay/relay.toml)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("CHERT_RELAY_LOG_LEVEL", "info"),
        choices=LOG_LEVELS,
    )
    p.add_argument(
        "--log-format",
        default=os.environ.get("CHERT_RELAY_LOG_FORMAT", "auto"),
        choices=LOG_FORMATS,
        help="text for terminals, json lines for machines (auto: by tty)",
    )
    commands = Commands(p, dest="command", metavar="COMMAND")

    for name, func, what, where in (
        (
            "run",
            cmd_run,
            "run every role in one process (receiver, poller, worker, admin)",
            "admin.listen",
        ),
        ("serve", cmd_serve, "run the receiver, the poller and the admin listener", "admin.listen"),
        (
            "worker",
            cmd_worker,
            "deliver queued events to sinks (and its own admin listener)",
            "admin.worker_listen",
        ),
    ):
        s = commands.add(name, help=what)
        s.add_argument(
            "--admin-listen",
            type=_admin_listen,
            metavar="HOST:PORT",
            help=f"this process's admin listener (default: {where}; port 0: any free "
            "port, logged; 'off': none) — e.g. one per worker on a host",
        )
        s.set_defaults(func=func)
    s = commands.add("check-config", help="validate the configuration and list every problem")
    s.set_defaults(func=cmd_check_config)

    s = commands.add("sign", help="sign a body (stdin) the way Chert signs webhooks")
    s.add_argument("--tenant", required=True, help="tenant slug (picks its secret from the config)")
    s.add_argument("--secret", help="webhook secret: the value, env:NAME or file:/path")
    s.add_argument("--timestamp", type=int, help="unix seconds to sign with (default: now)")
    s.add_argument("--legacy", action="store_true", help="legacy x-chert-signature format")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the headers as JSON")
    out.add_argument("--curl", metavar="URL", help="print a curl command posting stdin to URL")
    s.set_defaults(func=cmd_sign)

    from relay.upstream.backfill import cmd_backfill

    s = commands.add("backfill", help="pull a time range from Chert's events API through ingest")
    s.add_argument("--tenant", required=True, help="tenant slug")
    s.add_argument("--since", required=True, help="start, ISO-8601 (e.g. 2026-05-01T00:00:00Z)")
    s.add_argument("--until", help="end, ISO-8601 (default: up to now)")
    s.set_defaults(func=cmd_backfill)

    from relay.simulator.cli import add_simulate_parser

    add_simulate_parser(commands)

    from relay.listen.command import add_listen_parser

    add_listen_parser(commands)

    from relay.admin import deadletter_cli, events_cli

    deadletter_cli.add_parser(commands, _load_for_redis)
    events_cli.add_parser(commands, _load_for_redis)

    from relay.admin import sink_cli

    sink_cli.add_parser(commands, _load_for_redis)
    return p


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "text", "json")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # argparse checks an option's value, not a default taken from the environment
    for name, value, allowed in (
        ("CHERT_RELAY_LOG_LEVEL", args.log_level, LOG_LEVELS),
        ("CHERT_RELAY_LOG_FORMAT", args.log_format, LOG_FORMATS),
    ):
        if value not in allowed:
            print(
                f"chert-relay: cannot start: {name}={value!r} is not one of {', '.join(allowed)}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    logs.configure(args.log_level, args.log_format)
    try:
        code: int = args.func(args)
        return code
    except RelayError as e:
        if e.exit_code is None:
            raise
        # One line naming the cause: no traceback for a failure that is not a bug.
        if isinstance(e, ConfigError):
            log.error("cannot start: %s", e.one_line())
        elif isinstance(e, UnsafeRedisError):
            log.error("refusing to start: %s", e)
        else:
            log.error("cannot start: %s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("unexpected failure")
        return EXIT_FAILURE
