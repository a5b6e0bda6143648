"""Log-in sessions of the operator page, and its CSRF defences.

Logging in takes an admin token once, in a form; the page then knows the browser by a
session cookie — ``HttpOnly`` (no script can read it), ``SameSite=Strict`` (a browser
sends it on no request another site starts), ``Path=/ui``, and ``Secure`` when the
page is served over HTTPS (its own TLS, or a proxy's ``X-Forwarded-Proto: https`` or
``Forwarded: proto=https``). The token itself is never stored in the browser. A session
remembers only the SHA-256 of the token it logged in with and is checked against the
current configuration on every request, so a token removed or changed by a reload
logs its sessions out.

Every form that changes something carries the session's CSRF token (a random value
only the page itself has shown), compared in constant time; requests with an
``Origin`` header from another host are refused too. The log-in form is protected the
same way with a one-time value set as a cookie when the form is shown (double
submit), so another site cannot log a browser in with a token of its choosing. That
value is signed by this process (:class:`LoginNonces`) and dated: a log-in whose cookie
is not one this process gave out in the last :data:`LOGIN_FORM_S` is refused before its
form is read, so no one can make the page parse forms without having fetched it.

Sessions live in this process's memory: a restart, or another process's admin
listener, asks for the token again. They end after :data:`IDLE_S` without a request,
and :data:`MAX_AGE_S` after logging in. Each token keeps at most
:data:`MAX_PER_TOKEN` sessions — a new log-in past that ends that token's own oldest —
so no token, however often it logs in, can end another token's session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

SESSION_COOKIE = "chert_relay_session"
LOGIN_COOKIE = "chert_relay_login"
COOKIE_PATH = "/ui"
IDLE_S = 3600.0
MAX_AGE_S = 12 * 3600.0
MAX_PER_TOKEN = 50  # a token's own oldest session goes first past this
LOGIN_FORM_S = 3600  # how long a log-in form shown stays good


class LoginNonces:
    """The log-in form's double-submit values: ``<unix s>.<random>.<MAC>``, signed with
    a key of this process's own, so that a log-in can be checked before its form is
    read."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> str:
        text = f"{int(time.time())}.{secrets.token_urlsafe(18)}"
        return f"{text}.{self._mac(text)}"

    def valid(self, value: str) -> bool:
        """Whether ``value`` is one this process gave out, less than LOGIN_FORM_S ago."""
        text, _, mac = value.rpartition(".")
        stamp = text.partition(".")[0]
        if (
            not stamp.isascii()
            or not stamp.isdigit()
            or not hmac.compare_digest(
                mac.encode(errors="surrogateescape"), self._mac(text).encode()
            )
        ):
            return False
        return -60 <= time.time() - int(stamp) <= LOGIN_FORM_S


@dataclass
class Session:
    token_digest: bytes  # which admin token logged in (its SHA-256)
    csrf: str
    created: float
    seen: float


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode(errors="surrogateescape")).digest()


class Sessions:
    def __init__(self) -> None:
        self._by_key: dict[bytes, Session] = {}
        self._by_token: dict[bytes, OrderedDict[bytes, None]] = {}  # oldest first

    def create(self, token_digest: bytes) -> tuple[str, Session]:
        """A new session for the token with this digest: (cookie value, session)."""
        session_id = secrets.token_urlsafe(32)
        now = time.monotonic()
        session = Session(token_digest, secrets.token_urlsafe(32), now, now)
        key = _key(session_id)
        self._by_key[key] = session
        mine = self._by_token.setdefault(token_digest, OrderedDict())
        mine[key] = None
        while len(mine) > MAX_PER_TOKEN:
            oldest, _ = mine.popitem(last=False)
            self._by_key.pop(oldest, None)
        return session_id, session

    def _forget(self, key: bytes) -> None:
        session = self._by_key.pop(key, None)
        if session is None:
            return
        mine = self._by_token.get(session.token_digest)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_token[session.token_digest]

    def get(self, request: web.Request) -> Session | None:
        """The request's live session, if its cookie names one."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            return None
        key = _key(session_id)
        session = self._by_key.get(key)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > IDLE_S or now - session.created > MAX_AGE_S:
            self._forget(key)
            return None
        session.seen = now
        return session

    def drop(self, request: web.Request) -> None:
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            self._forget(_key(session_id))


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=served_over_https(request),
        max_age=int(MAX_AGE_S),
    )


def served_over_https(request: web.Request) -> bool:
    """Whether the browser reached the page over HTTPS: this listener's own TLS, or a
    TLS-terminating proxy saying so (``X-Forwarded-Proto`` or ``Forwarded: proto=``).
    The headers are the client's to set, and trusting them is safe here: all they can
    do is add ``Secure``, which keeps the cookie off plain HTTP."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if proto == "https":
        return True
    forwarded = request.headers.get("Forwarded", "").split(",")[0].lower()
    return any(p.strip().replace('"', "") == "proto=https" for p in forwarded.split(";"))


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=COOKIE_PATH)


def same(given: str | None, expected: str) -> bool:
    """Constant-time equality of a form value and the value it must be."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(errors="surrogateescape"), expected.encode())


def foreign_origin(request: web.Request) -> bool:
    """Whether the request says it comes from a page of another host (``Origin``)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not sent by every browser on every POST: the CSRF token decides
    _, _, host = origin.partition("://")
    return origin == "null" or host != request.host
