"""OAuth2 client credentials (RFC 6749 §4.4) for http sinks: the access token a sink
gets as ``Authorization: Bearer …``, fetched when a delivery first needs it and kept in
this process's memory only — never logged, never written to Redis or a job.

- One token per client (token URL, client id and secret, scope, audience, method):
  sinks that share a client share its token. A reload starts afresh.
- Kept until 30 s before its ``expires_in`` runs out, or 10% of its lifetime before for
  a token that lives less than 5 minutes; a token without ``expires_in``, 5 minutes.
- Single flight: the deliveries that need a token while one is being fetched wait for
  that fetch, and a fetch is not cancelled by a delivery that stops waiting.
- A sink's 401: the caller asks for a token other than the one refused (``stale``). The
  first to ask fetches; the others get that fetch's token — one refetch per refusal.
- The client authenticates with HTTP Basic (its id and secret form-encoded first, as
  §2.3.1 says), or with both in the form body (``auth_method = "post"``).

A failed fetch is a :class:`TokenError`, logged once as a warning until a fetch
succeeds again (then once as info); its text holds no secret of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote_plus, urlsplit

import aiohttp

from relay import __version__
from relay.config.egress import OAuth2Config
from relay.delivery.egress import Way, failure_text

log = logging.getLogger(__name__)

EXPIRY_MARGIN_S = 30.0  # a token is renewed this long before it expires...
EXPIRY_MARGIN_SHARE = 0.1  # ...or this share of its lifetime before, if that is less
DEFAULT_LIFETIME_S = 300.0  # a token whose answer has no expires_in
ANSWER_MAX_BYTES = 65536  # read of the token endpoint's answer
_USER_AGENT = f"chert-relay/{__version__}"

Key = tuple[str, str, str, str | None, str | None, str]


class TokenError(Exception):
    """No token: the endpoint could not be reached, failed, or refused the client."""


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    fresh_until: float  # on the cache's clock


def _key(conf: OAuth2Config) -> Key:
    return (
        conf.token_url,
        conf.client_id,
        conf.client_secret.get(),
        conf.scope,
        conf.audience,
        conf.auth_method,
    )


def _clip(value: object, limit: int = 200) -> str:
    return " ".join(str(value).split())[:limit]


def _lifetime(value: object) -> float:
    if isinstance(value, bool):
        return DEFAULT_LIFETIME_S
    if isinstance(value, int | float):
        return max(0.0, float(value))
    if isinstance(value, str) and value.strip().isdigit():
        return float(value.strip())
    return DEFAULT_LIFETIME_S


def parse_answer(status: int, raw: bytes, fetched_at: float) -> _Token:
    """The token in the endpoint's answer, or a :class:`TokenError` saying why not."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not 200 <= status < 300:
        said = f"HTTP {status}"
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            said += f" {_clip(body['error'], 80)}"  # invalid_client, invalid_scope…
            if isinstance(body.get("error_description"), str):
                said += f": {_clip(body['error_description'])}"
        raise TokenError(said)
    if not isinstance(body, dict):
        raise TokenError(f"HTTP {status}, but the answer is not a JSON object")
    token = body.get("access_token")
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise TokenError(f"HTTP {status}, but the answer has no usable access_token")
    if " " in token:
        raise TokenError(f"HTTP {status}, but the access_token holds a space")
    kind = body.get("token_type", "Bearer")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise TokenError(f"token_type {_clip(kind, 40)!r} is not Bearer")
    lifetime = _lifetime(body.get("expires_in"))
    margin = min(EXPIRY_MARGIN_S, lifetime * EXPIRY_MARGIN_SHARE)
    return _Token(token, fetched_at + lifetime - margin)


class Tokens:
    """The access tokens of one process's sinks, one per OAuth2 client."""

    def __init__(
        self, session: aiohttp.ClientSession, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._session = session
        self._clock = clock
        self._tokens: dict[Key, _Token] = {}
        self._fetching: dict[Key, asyncio.Task[_Token]] = {}
        self._failing: set[Key] = set()  # warned about, until a fetch succeeds

    def forget(self) -> None:
        """Drop every token (a reload may have changed a client); running fetches end
        on their own, unused."""
        self._tokens = {}
        self._fetching = {}

    async def close(self) -> None:
        tasks = list(self._fetching.values())
        self._fetching = {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def get(
        self,
        conf: OAuth2Config,
        way: Way,
        timeout: float,
        *,
        wait: float | None = None,
        stale: str | None = None,
    ) -> str:
        """A token for ``conf``'s client that is not ``stale`` (one a sink refused); a
        fetch it starts has ``timeout`` seconds.

        Raises :class:`TokenError`, or ``TimeoutError`` after ``wait`` seconds (default
        ``timeout``; the fetch goes on for whoever asks next)."""
        key = _key(conf)
        found = self._tokens.get(key)
        if found is not None and found.value != stale and self._clock() < found.fresh_until:
            return found.value
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(conf, way, timeout), name="oauth2-token")
            self._fetching[key] = task
            task.add_done_callback(lambda t: self._fetched(key, conf, t))
        async with asyncio.timeout(timeout if wait is None else wait):
            return (await asyncio.shield(task)).value

    def _fetched(self, key: Key, conf: OAuth2Config, task: asyncio.Task[_Token]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, whether or not anyone still waits
        if self._fetching.get(key) is not task:
            return  # started before a reload: its result is not kept
        del self._fetching[key]
        where = f"{urlsplit(conf.token_url).netloc} (client {conf.client_id})"
        if error is None:
            self._tokens[key] = task.result()
            if key in self._failing:
                self._failing.discard(key)
                log.info("OAuth2 token endpoint %s gives tokens again", where)
        elif key not in self._failing:
            self._failing.add(key)
            log.warning(
                "OAuth2 token endpoint %s: no token (%s); deliveries to its sinks are "
                "retried; logged again when it gives one",
                where,
                error,
            )

    async def _fetch(self, conf: OAuth2Config, way: Way, timeout: float) -> _Token:
        if way.problem is not None:
            raise TokenError(way.problem)
        secret = conf.client_secret.get()
        form = {"grant_type": "client_credentials"}
        if conf.scope is not None:
            form["scope"] = conf.scope
        if conf.audience is not None:
            form["audience"] = conf.audience
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if conf.auth_method == "basic":
            headers["Authorization"] = "Basic " + client_secrets(conf)[2]
        else:
            form |= {"client_id": conf.client_id, "client_secret": secret}
        started = self._clock()
        try:
            async with self._session.post(
                conf.token_url,
                data=form,
                headers=headers,
                ssl=way.ssl,
                proxy=way.proxy,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
                raw = b""
                while len(raw) < ANSWER_MAX_BYTES:  # the whole answer, however it comes
                    chunk = await resp.content.read(ANSWER_MAX_BYTES - len(raw))
                    if not chunk:
                        break
                    raw += chunk
        except TimeoutError:
            raise TokenError(f"no answer within {timeout:.1f}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise TokenError(self._hide(failure_text(e, conf.token_url), conf, way)) from None
        try:
            return parse_answer(status, raw, started)
        except TokenError as e:
            raise TokenError(self._hide(str(e), conf, way)) from None

    @staticmethod
    def _hide(text: str, conf: OAuth2Config, way: Way) -> str:
        """``text`` without the client's secret or the proxy's credentials in it."""
        hidden = [*client_secrets(conf), *way.secrets]
        for s in sorted((s for s in hidden if s), key=len, reverse=True):
            text = text.replace(s, "***")
        return text


def client_secrets(conf: OAuth2Config) -> list[str]:
    """The client's secret as it goes out: itself, form-encoded, and inside the Basic
    value (which an endpoint might echo)."""
    secret = conf.client_secret.get()
    basic = aiohttp.encode_basic_auth(quote_plus(conf.client_id), quote_plus(secret))
    return [secret, quote_plus(secret), basic.partition(" ")[2]]
