"""``worker.refuse_private_targets``: HTTP sinks only at public addresses.

Whoever writes a sink URL decides where the relay POSTs, from inside the firewall (the
README's "Who may write sink URLs"). Where sink URLs come from someone less trusted
than the relay's host, this refuses every address that is not globally routable —
loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16:
cloud metadata; fe80::/10), shared (100.64/10), unspecified, multicast, reserved:

- at load, a sink URL naming such an address, or ``localhost``, is a configuration
  error (:func:`relay.config.values.target_problem`);
- at delivery, a host name is resolved by :class:`PublicResolver`, which keeps only
  public addresses and fails the connection when none is left (so a name that resolves
  inward, or is rebound to, is never reached). The delivery is retried like any
  connection failure, its error naming this setting.

The proxies the sinks go through (``proxy``, ``HTTPS_PROXY``/``HTTP_PROXY``) are
operators' own, usually private, and exempt; behind a proxy the target is resolved by
the proxy, whose own rules apply. Broker sinks are not covered: brokers are inside.
"""

from __future__ import annotations

import os
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.config import Config
from relay.config.values import is_public
from relay.delivery.egress import proxy_hosts
from relay.errors import PrivateTarget

SETTING = "worker.refuse_private_targets"


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, keeping only public addresses (hosts in ``exempt`` as
    resolved)."""

    def __init__(self, exempt: frozenset[str] = frozenset()) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._exempt = exempt

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") in self._exempt:
            return found
        public = [r for r in found if is_public(r["host"])]
        if not public:
            raise PrivateTarget(
                f"{host} resolves only to non-public addresses "
                f"({', '.join(sorted({r['host'] for r in found}))}), refused by {SETTING}"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()


def connector(config: Config, **options: object) -> aiohttp.TCPConnector:
    """The connector HTTP sinks are reached through."""
    if config.worker.refuse_private_targets:
        options["resolver"] = PublicResolver(proxy_hosts(config, os.environ))
    return aiohttp.TCPConnector(**options)  # type: ignore[arg-type]
