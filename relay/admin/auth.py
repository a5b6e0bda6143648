"""Who an admin request speaks for: admin tokens, their scope and their tenants.

Tokens come from the configuration: ``admin.token`` (every tenant, scope ``replay``)
and each ``[[admin.tokens]]`` entry (a name, a scope, a list of tenants or ``["*"]``).
Scopes: ``read`` shows — the operator page, ``GET /api/…``, and ``/metrics`` when
``admin.metrics_token_required`` is set; ``replay`` also changes the dead-letter store,
replay *and* purge (both decide what happens to a delivery the relay gave up on, so one
scope covers both).

A token is checked against every configured token with a constant-time comparison of
SHA-256 digests, so neither which token matched nor the tokens' lengths show in the
time an answer takes. A :class:`Principal` is what the routes see: its name (for the
log lines of what it changed), its scope, and the tenants it may see.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from relay.config import Config
from relay.logs import Throttle

log = logging.getLogger(__name__)

Scope = Literal["read", "replay"]
_RANK: dict[str, int] = {"read": 0, "replay": 1}
LEGACY_NAME = "admin"  # the principal of admin.token


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scope: Scope
    tenants: frozenset[str] | None  # None: every tenant
    digest: bytes  # SHA-256 of the token: sessions remember which token logged in

    def can(self, scope: Scope) -> bool:
        return _RANK[self.scope] >= _RANK[scope]

    def sees(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def visible(self, tenants: Iterable[str]) -> list[str]:
        """The tenants of ``tenants`` this principal may see, in their order."""
        return [t for t in tenants if self.sees(t)]


PRINCIPAL = web.RequestKey("principal", Principal)  # set by the admin middleware


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenTable:
    """The configured admin tokens; :meth:`find` is the one constant-time lookup."""

    def __init__(self, config: Config) -> None:
        admin = config.admin
        entries: list[Principal] = []
        if admin.token is not None:
            entries.append(
                Principal(LEGACY_NAME, "replay", None, digest(admin.token.get().encode()))
            )
        for t in admin.tokens:
            tenants = None if t.all_tenants else frozenset(t.tenants)
            entries.append(Principal(t.name, t.scope, tenants, digest(t.token.get().encode())))
        self._entries = tuple(entries)
        self.metrics_token_required = admin.metrics_token_required

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def find(self, token: bytes) -> Principal | None:
        """The principal whose token is ``token``, if any (every entry is compared)."""
        return self.by_digest(digest(token))

    def by_digest(self, given: bytes) -> Principal | None:
        found = None
        for p in self._entries:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(p.digest, given):
                found = p
        return found


def bearer(request: web.Request) -> bytes | None:
    """The token of an ``Authorization: Bearer …`` header, as bytes (any bytes)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip().encode(errors="surrogateescape")


def principal(request: web.Request) -> Principal:
    """The principal the admin middleware authenticated for this request."""
    try:
        return request[PRINCIPAL]
    except KeyError:
        raise RuntimeError("no principal: route not behind the admin token check") from None


class Refusals:
    """A refused admin request's answer, log line and metric. The lines are throttled per
    reason, whatever the client: refusals from a thousand addresses are one line every
    10 s (naming the last client) with a count of the rest, not a line each."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._throttle = Throttle(interval=10.0)

    def refuse(
        self, request: web.Request, status: int, reason: str, message: str, *, who: str = "-"
    ) -> web.Response:
        self.note(request, reason, who=who)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return web.json_response(
            {"error": reason, "message": message}, status=status, headers=headers
        )

    def note(self, request: web.Request, reason: str, *, who: str = "-") -> None:
        """Count and log (throttled) a refusal the caller answers itself."""
        self._count(reason)
        suppressed = self._throttle.allow(reason)
        if suppressed is not None:
            log.warning(
                "admin: refused %s %s from %s (token %s): %s%s",
                request.method,
                request.path,
                request.remote,
                who,
                reason,
                f" ({suppressed} more since the last line)" if suppressed else "",
            )

    def forbidden_tenant(self, request: web.Request, who: Principal, tenant: str) -> web.Response:
        return self.refuse(
            request,
            403,
            "forbidden_tenant",
            f"this token may not see tenant {tenant!r}",
            who=who.name,
        )

    def forbidden_scope(self, request: web.Request, who: Principal, scope: Scope) -> web.Response:
        return self.refuse(
            request,
            403,
            "forbidden_scope",
            f"this token's scope is {who.scope!r}; this needs {scope!r}",
            who=who.name,
        )
