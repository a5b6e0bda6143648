"""A real OAuth2 token endpoint for the tests (aiohttp on 127.0.0.1): the client
credentials grant, counting what it is asked, and a sink behaviour that accepts only
the tokens it issued and has not revoked."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from relay.store.embedded import free_port
from tests.support.delivery import Received, Reply, Sink


@dataclass
class Asked:
    """One request the endpoint took: its form and how the client authenticated."""

    form: dict[str, str]
    client_id: str | None
    client_secret: str | None
    basic: bool  # by HTTP Basic (else in the form)


@dataclass
class TokenEndpoint:
    client_id: str
    client_secret: str
    expires_in: Any = 3600  # None: left out of the answer
    ssl_context: ssl.SSLContext | None = None
    fail: int | None = None  # answer every request with this status (and an error)
    gate: asyncio.Event | None = None  # when set: answer only once it is set
    asked: list[Asked] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    url: str = ""
    _runner: web.AppRunner | None = None

    @property
    def fetches(self) -> int:
        return len(self.asked)

    def valid(self, token: str) -> bool:
        return token in self.issued and token not in self.revoked

    def revoke_all(self) -> None:
        self.revoked.update(self.issued)

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        auth = request.headers.get("Authorization", "")
        basic = auth.startswith("Basic ")
        client_id: str | None
        secret: str | None
        if basic:
            decoded = base64.b64decode(auth[6:]).decode()
            user, _, password = decoded.partition(":")
            client_id, secret = unquote_plus(user), unquote_plus(password)
        else:
            client_id, secret = form.get("client_id"), form.get("client_secret")
        self.asked.append(Asked(form, client_id, secret, basic))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            return _error(self.fail, "temporarily_unavailable", "try later")
        if client_id != self.client_id or secret != self.client_secret:
            # Some endpoints echo what they were given: the relay must scrub it.
            return _error(401, "invalid_client", f"unknown client {client_id}:{secret}")
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "")
        token = f"tok-{len(self.issued)}-{secrets.token_urlsafe(24)}"
        self.issued.append(token)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if "scope" in form:
            answer["scope"] = form["scope"]
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def start(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", free_port(), ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        scheme = "http" if self.ssl_context is None else "https"
        self.url = f"{scheme}://127.0.0.1:{port}/oauth2/token"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TokenEndpoint:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def oauth2(self, **extra: Any) -> dict[str, Any]:
        """A sink's ``oauth2`` table for this endpoint (the secret from ``env:``)."""
        return {
            "token_url": self.url,
            "client_id": self.client_id,
            "client_secret": "env:CLIENT_SECRET",
        } | extra


def _error(status: int, code: str, description: str) -> web.Response:
    body = {"error": code} | ({"error_description": description} if description else {})
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def bearer_only(endpoint: TokenEndpoint) -> Any:
    """A sink behaviour: 401 unless the request carries a valid token of ``endpoint``."""

    def behave(sink: Sink, got: Received) -> Reply:
        scheme, _, token = got.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not endpoint.valid(token):
            return 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return 200, {}

    return behave
