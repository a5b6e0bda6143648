"""Which ``Host`` the admin listener answers: a defence against DNS rebinding.

A web page the operator opens can make its own name resolve to 127.0.0.1 and then read
what the admin listener answers without a token (``/metrics`` unless
``admin.metrics_token_required``, ``/healthz``, ``/readyz``): the browser sends that
page's name as ``Host``. So the listener answers only a ``Host`` it expects:

- an IP address (v4 or v6) or ``localhost`` (and ``*.localhost``) always;
- the names in ``admin.allowed_hosts`` (``"relay.internal"``, ``"*.internal"``; ``"*"``
  for any);
- with ``allowed_hosts`` unset, any name when the listener is not on a loopback
  address (Prometheus scrapes it by DNS name; a browser page cannot rebind to it
  unless it is reachable), and only the above when it is (the default, 127.0.0.1).

Anything else is ``421 Misdirected Request`` (``host_not_allowed``). A request without
``Host`` (HTTP/1.0) is answered.
"""

from __future__ import annotations

import ipaddress

from relay.config.values import Listen


class HostCheck:
    def __init__(self, allowed: list[str] | None, listen: Listen | None) -> None:
        if allowed is None:
            loopback = listen is not None and (listen.path is not None or _loopback(listen.host))
            allowed = [] if loopback else ["*"]
        names = [a.lower().rstrip(".") for a in allowed]
        self.any = "*" in names
        self._exact = frozenset(n for n in names if not n.startswith("*."))
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    def allows(self, host: str | None) -> bool:
        if self.any or not host:
            return True
        name = _name(host)
        if name is None:
            return False
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
            return True
        return name in self._exact or name.endswith(self._suffixes)


def _name(host: str) -> str | None:
    """The name in a ``Host`` value, without its port (``[v6]:port`` too), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    name, _, _ = host.partition(":")
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _loopback(host: str | None) -> bool:
    if host in (None, ""):
        return False  # every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
