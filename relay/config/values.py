"""The value types the configuration is made of: durations, secrets, listen addresses
and URLs, each parsed from what a TOML file (or the environment) gives.

Durations accept seconds or ``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``; sizes,
bytes or ``"512KiB"``, ``"256MiB"``, ``"1GiB"``.
Secrets are ``"env:NAME"``, ``"file:/path"`` or a literal (accepted, with a warning).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo
from yarl import URL

from relay.errors import ConfigError

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
MAX_DURATION_S = 10 * 365 * 86400.0  # anything longer is a typo, and Redis TTLs must fit
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(
                f"{value!r} is not a duration; use seconds or e.g. '30s', '5m', '2h', '7d'"
            )
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if math.isnan(seconds):
        raise ValueError("a duration must be a number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError("a duration cannot be longer than 10 years")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

_RATE_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(s|m|min)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0}
MAX_RATE = 10_000.0  # per second: a faster pace is a typo (and no sink is paced finer)
MIN_RATE = 1 / 60  # one a minute: slower is a typo for a pause (chert-relay sinks pause)


def parse_rate(value: object) -> float:
    """Deliveries per second from ``"50/s"``, ``"3000/m"`` or ``"3000/min"``."""
    if not isinstance(value, str) or not (m := _RATE_RE.match(value)):
        raise ValueError(
            f"{value!r} is not a rate; use a string like '50/s' or '3000/m' (per minute)"
        )
    per_s = float(m.group(1)) / _RATE_UNITS[m.group(2)]
    if per_s <= 0:
        raise ValueError("a rate must be more than 0 (leave `rate` out for no limit)")
    if per_s > MAX_RATE:
        raise ValueError(f"a rate cannot be more than {MAX_RATE:g}/s")
    if per_s < MIN_RATE - 1e-12:
        raise ValueError("a rate cannot be less than 1/m")
    return per_s


Rate = Annotated[float, BeforeValidator(parse_rate)]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512KiB"``, ``"256MiB"``, ``"1GiB"`` (or KB/MB/GB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a size; use bytes or e.g. '512KiB', '256MiB', '1GiB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Size = Annotated[int, BeforeValidator(parse_size)]


class Secret:
    """A secret value with where it came from; never shows the value in repr or str.

    A secret a command was told it does not need (:func:`lenient_secret`) may be
    *unresolved*: its ``env:`` variable unset or its file unreadable in this shell. It
    equals no other secret, and :meth:`get` raises :class:`~relay.errors.ConfigError`
    with the reason — so a command that turns out to need it fails with exit code 78.
    """

    __slots__ = ("_value", "origin", "problem")

    def __init__(self, value: str, origin: str, problem: str | None = None) -> None:
        self._value = value
        self.origin = origin  # "env:NAME", "file:/path" or "literal"
        self.problem = problem  # why it is unresolved; None: it is resolved

    @classmethod
    def unresolved(cls, origin: str, problem: str) -> Secret:
        return cls("", origin, problem)

    @property
    def resolved(self) -> bool:
        return self.problem is None

    def get(self) -> str:
        if self.problem is not None:
            raise ConfigError([("", f"{self.origin}: {self.problem}")])
        return self._value

    @property
    def is_literal(self) -> bool:
        return self.origin == "literal"

    def __repr__(self) -> str:
        return f"Secret({self.origin})" if self.resolved else f"Secret({self.origin}, unresolved)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Secret)
            and self.resolved
            and other.resolved
            and other._value == self._value
        )

    def __hash__(self) -> int:
        return hash(self._value) if self.resolved else id(self)


def resolve_secret(value: object, base_dir: Path | None = None) -> Secret:
    """Resolve ``env:NAME``, ``file:/path`` (relative to ``base_dir``) or a literal."""
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("a secret is a string: 'env:NAME', 'file:/path' or the literal value")
    if value.startswith("env:"):
        name = value[4:]
        if not name:
            raise ValueError("'env:' needs a variable name")
        found = os.environ.get(name)
        if found is None or found == "":
            raise ValueError(f"environment variable {name} is not set")
        return Secret(found.strip(), value)
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"cannot read secret file {path}: {e.strerror}") from None
        if not text:
            raise ValueError(f"secret file {path} is empty")
        return Secret(text, f"file:{path}")
    if not value:
        raise ValueError("a secret cannot be empty")
    return Secret(value, "literal")


def _secret_validator(value: object, info: ValidationInfo) -> Secret:
    base = (info.context or {}).get("base_dir")
    return resolve_secret(value, base)


def _maybe_unresolved(value: object, info: ValidationInfo, lenient: bool) -> Secret:
    context = info.context or {}
    try:
        return resolve_secret(value, context.get("base_dir"))
    except ValueError as e:
        if lenient and isinstance(value, str) and value.startswith(("env:", "file:")):
            return Secret.unresolved(value, str(e))
        raise


def lenient_secret(value: object, info: ValidationInfo) -> Secret:
    """:func:`_secret_validator` for a secret that only some commands use (the admin
    tokens: only the admin listener reads them). When the validation context has
    ``admin_tokens`` false, an ``env:``/``file:`` secret that cannot be read here is
    kept unresolved instead of failing the whole configuration: an operator's shell
    need not hold the service's secrets to list dead letters."""
    context = info.context or {}
    lenient = context.get("admin_tokens", True) is False or context.get("redis_only") is True
    return _maybe_unresolved(value, info, lenient)


def service_secret(value: object, info: ValidationInfo) -> Secret:
    """:func:`_secret_validator` for a secret the service uses and the commands that
    only read and change the relay's Redis (``dlq``, ``events``, ``sinks``) do not: the
    webhook secrets, the sinks' secrets and credentials, the API's signing secret. With
    ``redis_only`` in the validation context, an ``env:``/``file:`` one that cannot be
    read here is kept unresolved: those variables are often set for the service alone
    (systemd's ``EnvironmentFile``), not in the operator's shell."""
    return _maybe_unresolved(value, info, (info.context or {}).get("redis_only") is True)


SecretField = Annotated[Secret, BeforeValidator(_secret_validator)]
# A secret the commands that do not use it may leave unresolved (see lenient_secret).
LenientSecretField = Annotated[Secret, BeforeValidator(lenient_secret)]
# A secret only the service uses (see service_secret); [redis]'s stay SecretField.
ServiceSecretField = Annotated[Secret, BeforeValidator(service_secret)]


class Listen(BaseModel):
    """A TCP ``host:port`` or ``unix:/path`` to listen on."""

    model_config = ConfigDict(frozen=True)
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def address_text(sockname: object) -> str:
    """A bound socket's address as a listen setting would name it: ``host:port`` or
    ``unix:/path`` (for logs: with port 0, this is where it really listens)."""
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host = f"[{sockname[0]}]" if ":" in str(sockname[0]) else sockname[0]
        return f"{host}:{sockname[1]}"
    return f"unix:{sockname}"


def parse_listen(value: object) -> Listen:
    if isinstance(value, Listen):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("listen is 'host:port' or 'unix:/path'")
    if value.startswith("unix:"):
        if not value[5:]:
            raise ValueError("'unix:' needs a socket path: 'unix:/run/chert-relay.sock'")
        return Listen(path=value[5:])
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not 'host:port' or 'unix:/path'")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host=host, port=p)


ListenField = Annotated[Listen, BeforeValidator(parse_listen)]


def check_http_url(value: str) -> str:
    # The errors never show the value: a mistyped URL may carry a credential.
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL (scheme://host/…)")
    if any(c.isspace() for c in value):
        raise ValueError("a URL cannot contain spaces")
    try:
        parts.port  # noqa: B018 - raises when out of range or not a number
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    return value


def plain_remote(url: object) -> bool:
    """Whether ``url`` is plain http:// to a host other than this machine's loopback."""
    parts = urlsplit(str(url))
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


HttpUrl = Annotated[str, BeforeValidator(lambda v: check_http_url(v) if isinstance(v, str) else v)]


def parse_host_port(value: object) -> tuple[str, int]:
    """``"host:port"`` (a Sentinel's address) as a pair."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], int(value[1])
    if not isinstance(value, str):
        raise ValueError("an address is 'host:port'")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{value!r} is not 'host:port'")
    return host, int(port)


HostPort = Annotated[tuple[str, int], BeforeValidator(parse_host_port)]


def is_public(address: str) -> bool:
    """Whether ``address`` is globally routable (and not multicast); a name is not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            ip = inner  # an IPv6 form that reaches an IPv4 address: that address decides
    return ip.is_global and not ip.is_multicast


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPAT = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped, NAT64, 6to4, Teredo, compatible."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64) or ip in _COMPAT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def target_problem(url: str) -> str | None:
    """Why ``url`` names a non-public target outright (an address or localhost)."""
    host = (URL(url).host or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is this machine"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: resolved, and checked, at delivery
    return None if is_public(host) else f"{host} is not a public address"
