"""``chert-relay listen``: its options, its credentials, and the run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from relay.commands import Commands
from relay.config import ApiConfig, PollConfig, SinkConfig, TenantConfig, load_config
from relay.config.values import Secret, resolve_secret
from relay.errors import EXIT_OK, ConfigError
from relay.listen.forwarder import ListenAuthError, Listener
from relay.listen.state import ListenState, default_state_dir
from relay.upstream.chert_api import isoformat

FORWARD_TIMEOUT_S = 10.0


# --- the command -------------------------------------------------------------------------


_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # a tenant slug, as the configuration has it


def _slug(value: str) -> str:
    # Checked before it names a directory under the state directory.
    if not _SLUG.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a tenant slug")
    return value


def _forward_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL")
    return value


def add_listen_parser(commands: Commands) -> None:
    """``chert-relay listen`` on the command line's commands."""
    s = commands.add(
        "listen",
        config_help="relay configuration: take the tenant's [tenants.api] credentials from it",
        help="forward a tenant's events to a local URL (no public URL needed)",
        description=(
            "Tail Chert's event stream for one tenant and forward each event to a local "
            "URL, signed with a whsec_ secret (printed at start). Credentials: the "
            "tenant's [tenants.api] in --config FILE, or --api-url/--auth/--api-secret, "
            "or CHERT_API_URL, CHERT_API_AUTH and CHERT_API_SECRET."
        ),
    )
    s.add_argument("--tenant", required=True, type=_slug, help="tenant slug")
    s.add_argument(
        "--forward-to", required=True, type=_forward_url, metavar="URL", help="local URL"
    )
    s.add_argument(
        "--events",
        default="*",
        metavar="TYPES",
        help="comma-separated event types or globs to forward (default: all)",
    )
    s.add_argument("--api-url", help="Chert's API base URL (default: $CHERT_API_URL, or Chert's)")
    s.add_argument(
        "--auth", choices=["hmac", "bearer"], help="API auth mode (default: $CHERT_API_AUTH, hmac)"
    )
    s.add_argument(
        "--api-secret",
        metavar="SECRET",
        help="API signing secret: the value, env:NAME or file:PATH (default: $CHERT_API_SECRET)",
    )
    s.add_argument(
        "--state-dir",
        type=Path,
        help="where the cursor and the whsec_ secret are kept "
        "(default: $XDG_STATE_HOME/chert-relay/listen/TENANT, or ~/.local/state/…)",
    )
    s.set_defaults(func=cmd_listen)


def _sink(url: str, events: str, secret: str) -> dict[str, Any]:
    types = [t.strip() for t in events.split(",") if t.strip()] or ["*"]
    return {
        "name": "listen",
        "url": url,
        "events": types,
        "secret": secret,
        "timeout": FORWARD_TIMEOUT_S,
    }


def listen_api(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ApiConfig:
    """The tenant's API credentials: from ``--config FILE``, else options, else environment.

    Raises :class:`ConfigError` (exit 78) when they are missing or invalid.
    """
    config_file = getattr(args, "config", None)
    flags = [f for f in ("api_url", "auth", "api_secret") if getattr(args, f, None)]
    if config_file is not None:
        if flags:
            names = ", ".join("--" + f.replace("_", "-") for f in flags)
            raise ConfigError(
                [(names, "the credentials come from --config FILE or from options, not both")],
                "the command line",
            )
        config = load_config(config_file, admin_tokens=False)
        found = config.tenant(args.tenant)
        if found is None:
            raise ConfigError(
                [("tenants", f"no tenant {args.tenant!r} in the configuration")], config_file
            )
        if found.api.signing_secret is None:
            raise ConfigError(
                [
                    (
                        f"tenants[{args.tenant}].api.signing_secret",
                        "not set: listen calls Chert's events API with the tenant's "
                        "API credentials",
                    )
                ],
                config_file,
            )
        return found.api
    else:
        secret_text = args.api_secret or environ.get("CHERT_API_SECRET")
        if not secret_text:
            raise ConfigError(
                [
                    (
                        "--api-secret",
                        "no API credentials: pass --config FILE (the tenant's "
                        "[tenants.api]), or --api-secret (or set CHERT_API_SECRET) with "
                        "--api-url and --auth (or CHERT_API_URL and CHERT_API_AUTH)",
                    )
                ],
                "the command line",
            )
        try:
            api_secret: Secret = resolve_secret(secret_text)
        except ValueError as e:
            raise ConfigError([("--api-secret", str(e))], "the command line") from None
        fields: dict[str, Any] = {"signing_secret": api_secret}
        auth = args.auth or environ.get("CHERT_API_AUTH")
        url = args.api_url or environ.get("CHERT_API_URL")
        if auth:
            fields["auth"] = auth
        if url:
            fields["base_url"] = url
        with _as_config_error("api"):
            return ApiConfig(**fields)


def listen_tenant(args: argparse.Namespace, api: ApiConfig, secret: str) -> TenantConfig:
    """The tenant to listen as: its API credentials, and the local URL as its one sink."""
    with _as_config_error(""):
        return TenantConfig(
            slug=args.tenant,
            api=api,
            poll=PollConfig(mode="sse"),
            sinks=[SinkConfig(**_sink(args.forward_to, args.events, secret))],
        )


@contextlib.contextmanager
def _as_config_error(prefix: str) -> Iterator[None]:
    try:
        yield
    except ValidationError as e:
        problems = [
            (".".join([prefix, *(str(p) for p in err["loc"])]).strip("."), err["msg"])
            for err in e.errors()
        ]
        raise ConfigError(problems, "the command line") from None


def cmd_listen(args: argparse.Namespace) -> int:
    directory: Path = args.state_dir or default_state_dir(args.tenant)
    api = listen_api(args)  # before anything is written: bad credentials leave no trace
    state = ListenState.open(directory)
    tenant = listen_tenant(args, api, state.secret)
    with state.locked():
        listener = Listener(tenant, state)
        out = listener.out
        print(
            f"Forwarding {tenant.slug}'s events from {tenant.api.base_url} to {listener.sink.url}",
            file=out,
        )
        print(f"Your webhook signing secret is {state.secret}", file=out)
        if state.watermark is not None:
            print(f"Resuming after {isoformat(state.watermark)} (state: {directory})", file=out)
        else:
            state.start_now()  # kept at once: a restart before any event resumes from here
            print(f"Starting with events from now on (state: {directory})", file=out)
        print("Ctrl-C to stop.", file=out, flush=True)
        try:
            asyncio.run(_run_until_signalled(listener))
        except* ListenAuthError as group:
            raise group.exceptions[0] from None
        print(
            f"Stopped: {listener.delivered} event(s) forwarded, {listener.failed} given up on.",
            file=out,
            flush=True,
        )
    return EXIT_OK


async def _run_until_signalled(listener: Listener) -> None:
    """Run until SIGTERM or SIGINT (then exit 0), or until the listener fails.

    The state file is rewritten after each event, so stopping anywhere loses nothing.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    task = asyncio.create_task(listener.run(), name="listen")
    waiter = asyncio.create_task(stop.wait(), name="listen:signal")
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        task.result()  # the listener's failure, if it stopped on its own
