"""A small counting sink for trying the relay: ``chert-relay simulate --sink 127.0.0.1:8090``.

It accepts any ``POST``, answers 200, and counts deliveries, distinct event ids
(``webhook-id``) and repeats, so a user can watch every event arrive exactly
where it should; ``GET /_sink/stats`` gives the counts as JSON. When the relay
configuration names a Standard Webhooks secret for a sink at this address, each
delivery's ``webhook-signature`` is checked too.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from relay.signing import standard_webhooks_signature

log = logging.getLogger(__name__)

TOLERANCE = 300


@dataclass
class CountingSink:
    keys: list[bytes] = field(default_factory=list)  # Standard Webhooks keys to verify with
    received: int = 0
    bad_signatures: int = 0
    seen: set[str] = field(default_factory=set)
    by_type: dict[str, int] = field(default_factory=dict)

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def repeats(self) -> int:
        return self.received - self.unique

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/_sink/stats", self.stats)
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    def counts(self) -> dict[str, object]:
        return {
            "received": self.received,
            "distinct": self.unique,
            "repeats": self.repeats,
            "bad_signatures": self.bad_signatures,
            "by_type": dict(self.by_type),
        }

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg_id = request.headers.get("webhook-id", "")
        self.received += 1
        if not msg_id:  # not from the relay: a Chert-style push straight from the simulator
            msg_id = request.headers.get("X-Webhook-Event-Id", "")
        if (
            self.keys
            and "webhook-signature" in request.headers
            and not self._verified(request, msg_id, body)
        ):
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        if msg_id:
            self.seen.add(msg_id)
        headers = request.headers
        etype = headers.get("X-Chert-Event-Type") or headers.get("X-Webhook-Event") or "unknown"
        self.by_type[etype] = self.by_type.get(etype, 0) + 1
        return web.json_response({"ok": True})

    def _verified(self, request: web.Request, msg_id: str, body: bytes) -> bool:
        stamp = request.headers.get("webhook-timestamp", "")
        given = request.headers.get("webhook-signature", "").split()
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE:
            return False
        ok = False
        for key in self.keys:
            expected = standard_webhooks_signature(key, msg_id, int(stamp), body)
            for candidate in given:
                ok |= hmac.compare_digest(expected.encode(), candidate.encode())
        return ok
