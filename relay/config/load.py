"""Reading the configuration: the file (TOML), environment overrides, validation into
:class:`relay.config.Config`, and a :class:`~relay.errors.ConfigError` that lists every
problem with its key path — the tenant-level checks included, even when one of the
tenant's fields failed (pydantic skips a model's own checks then).

Environment variables ``CHERT_RELAY__<SECTION>__<KEY>`` override single settings of the
top-level sections (``CHERT_RELAY__REDIS__URL=redis://…``).
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from relay.config.filters import FilterError
from relay.config.models import Config, repeated, tenant_problems
from relay.errors import ConfigError

ENV_PREFIX = "CHERT_RELAY__"
DEFAULT_CONFIG_PATHS = ("/etc/chert-relay/relay.toml",)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("literal", "union"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


_SECRET_KEYS = frozenset({("admin", "token"), ("redis", "url")})


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, str, object]]:
    out: list[tuple[str, str, object]] = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            continue
        value: object = raw
        if (parts[0], parts[1]) not in _SECRET_KEYS:  # a token of digits stays a string
            with contextlib.suppress(tomllib.TOMLDecodeError):  # not TOML: the text itself
                value = tomllib.loads(f"v = {raw}")["v"]
        out.append((parts[0], parts[1], value))
    return out


def config_path(given: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The configuration file to read: ``given`` (``--config``), else
    ``$CHERT_RELAY_CONFIG``, else the first of :data:`DEFAULT_CONFIG_PATHS` that exists
    (or the first, for the error message)."""
    if given:
        return Path(given)
    found = (os.environ if env is None else env).get("CHERT_RELAY_CONFIG")
    if found:
        return Path(found)
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).exists():
            return Path(candidate)
    return Path(DEFAULT_CONFIG_PATHS[0])


def load_config(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    admin_tokens: bool = True,
    redis_only: bool = False,
) -> Config:
    """Read, override from the environment, and validate the whole configuration.

    ``admin_tokens=False`` is for the commands that do not serve the admin listener
    (``dlq``, ``backfill``, ``sign``, ``simulate``): an admin token whose ``env:``
    variable is unset (or ``file:`` unreadable) in this shell is left unresolved
    instead of being a problem. The service and ``check-config`` keep the default.

    ``redis_only=True`` is for the commands that only read and change the relay's Redis
    (``dlq``, ``events``, ``sinks``): every secret but ``[redis]``'s may then be left
    unresolved the same way — the webhook secrets, the sinks' secrets and credentials,
    the API's signing secret. A command that uses an unresolved secret after all fails
    with exit code 78 and the reason, when it reads it.

    Raises :class:`ConfigError` listing every problem with its key path.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([("", f"cannot read {path}: {e.strerror}")], str(path)) from None
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([("", f"not valid TOML: {e}")], str(path)) from None
    return parse_config(
        data,
        base_dir=path.resolve().parent,
        env=env,
        source=str(path),
        admin_tokens=admin_tokens,
        redis_only=redis_only,
    )


def parse_config(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "",
    admin_tokens: bool = True,
    redis_only: bool = False,
) -> Config:
    problems: list[tuple[str, str]] = []
    for section, key, value in _env_overrides(os.environ if env is None else env):
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append((f"{section}", f"cannot override {ENV_PREFIX}{section.upper()}__…"))
            continue
        target[key] = value
    if problems:
        raise ConfigError(problems, source)
    try:
        context = {"base_dir": base_dir, "admin_tokens": admin_tokens, "redis_only": redis_only}
        return Config.model_validate(data, context=context)
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            msg, where = err["msg"], _loc_to_path(tuple(err["loc"]))
            cause = err.get("ctx", {}).get("error")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif isinstance(cause, FilterError):  # the key path goes on inside the filter
                msg, where = str(cause), where + cause.where
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            problems.append((where, msg))
        for found in _tenant_checks_on_raw(data, problems):
            if found not in problems:
                problems.append(found)
        raise ConfigError(problems, source) from None


def _tenant_checks_on_raw(
    data: dict[str, Any], problems: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The tenant-level checks, for the tenants whose own fields failed (pydantic skips
    a model's checks then), so that one run reports every problem."""
    tenants = data.get("tenants")
    if not isinstance(tenants, list):
        return []
    out: list[tuple[str, str]] = []
    for i, raw in enumerate(tenants):
        where = f"tenants[{i}]"
        if not isinstance(raw, dict) or not any(p.startswith(where + ".") for p, _ in problems):
            continue
        poll, api = raw.get("poll", {}), raw.get("api", {})
        mode = poll.get("mode", "fallback") if isinstance(poll, dict) else None
        if mode not in ("off", "fallback", "always", "sse"):
            continue  # reported as a field problem already
        secrets = raw.get("webhook_secrets")
        signing = isinstance(api, dict) and api.get("signing_secret") is not None
        for msg in tenant_problems(bool(secrets), mode, signing):
            out.append((where, msg))
        sinks = raw.get("sinks")
        if isinstance(sinks, list):
            dupes = repeated(
                s["name"] for s in sinks if isinstance(s, dict) and isinstance(s.get("name"), str)
            )
            if dupes:
                msg = f"sink names must be unique within a tenant: {', '.join(dupes)}"
                out.append((f"{where}.sinks", msg))
    return out
