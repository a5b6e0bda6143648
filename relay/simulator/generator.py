"""Realistic Chert event bodies (chert-contract.md §3) for the simulator's event log.

Each tenant has a small, growing set of conversations (a chat with one lead on
one line), so ``lead_id`` filters and per-chat traffic look like a real inbox.
``message.received`` follows the documented envelope; ``reaction.added``,
``reaction.removed`` and the legacy ``lead_reply`` use plausible bodies of the
same shape (``lead_reply`` also carries the legacy top-level fields). Any other
type gets a minimal envelope, so pass-through of unknown types can be tried too.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

EVENT_TYPES = ("message.received", "reaction.added", "reaction.removed", "lead_reply")
# Relative frequency of each type when none is asked for.
DEFAULT_WEIGHTS = {
    "message.received": 70,
    "reaction.added": 12,
    "reaction.removed": 6,
    "lead_reply": 12,
}

_TEXTS = (
    "Sure, what time?",
    "Sounds good, thanks!",
    "Can we move it to Thursday?",
    "Who is this?",
    "Yes please send the details",
    "Not interested, thanks",
    "I'll be there at 3",
    "What's the price for two?",
    "Call me after 5pm",
    "👍",
    "Perfect, see you then",
    "Can you resend the link?",
    "STOP",
    "Is this still available?",
    "Running 10 minutes late",
)
_REACTIONS = ("love", "like", "dislike", "laugh", "emphasize", "question")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass
class _Conversation:
    chat_id: str
    lead_id: str
    convo_id: str
    line_id: str
    lead_handle: str
    owner_handle: str
    last_message_id: str | None = None


class EventGenerator:
    """Makes envelopes; all randomness comes from the ``rng`` it is given."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._convos: dict[str, list[_Conversation]] = {}

    # --- ids -------------------------------------------------------------------------

    def uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def hex(self, nbytes: int) -> str:
        return self._rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    def ulid(self, ms: int) -> str:
        """A ULID: 48-bit time then 80 random bits, Crockford base32 (26 chars)."""
        n = (ms << 80) | self._rng.getrandbits(80)
        return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))

    def _phone(self) -> str:
        return f"+1415{self._rng.randrange(2_000_000, 9_999_999):07d}"

    def _conversation(self, tenant: str, ms: int) -> _Conversation:
        convos = self._convos.setdefault(tenant, [])
        if len(convos) < 3 or (len(convos) < 50 and self._rng.random() < 0.2):
            convos.append(
                _Conversation(
                    chat_id=self.uuid(),
                    lead_id=f"ld_{self.ulid(ms)}",
                    convo_id=f"cv_{self.ulid(ms)}",
                    line_id=f"ln_{self.hex(6)}",
                    lead_handle=self._phone(),
                    owner_handle=self._phone(),
                )
            )
            return convos[-1]
        return self._rng.choice(convos)

    # --- bodies ----------------------------------------------------------------------

    def make(self, tenant: str, event_type: str, timestamp: str, ms: int) -> dict[str, Any]:
        """A log row's identifying fields plus its envelope: ``{"event_id", "lead_id",
        "convo_id", "payload"}``."""
        convo = self._conversation(tenant, ms)
        me = {"handle": convo.owner_handle, "service": "imessage", "is_me": True}
        lead = {"handle": convo.lead_handle, "service": "imessage", "is_me": False}
        chat = {"id": convo.chat_id, "is_group": False, "handles": [me, lead], "owner_handle": me}
        data: dict[str, Any] = {"chat": chat}
        extra: dict[str, Any] = {}
        if event_type in ("message.received", "lead_reply"):
            message_id = self.uuid().upper()
            event_id = f"chert:msg:{message_id}"
            text = self._rng.choice(_TEXTS)
            parts: list[dict[str, Any]] = [{"type": "text", "value": text}]
            if self._rng.random() < 0.1:
                parts.append({"type": "media", "attachment_id": f"in_{self.hex(16)}"})
            data["message"] = {
                "id": message_id,
                "direction": "inbound",
                "sender_handle": lead,
                "parts": parts,
            }
            convo.last_message_id = message_id
            if event_type == "lead_reply":
                event_id = f"chert:lead_reply:{message_id}"
                data["lead"] = {"id": convo.lead_id, "convo_id": convo.convo_id}
                extra = {
                    "from": convo.lead_handle,
                    "to": convo.owner_handle,
                    "text": text,
                    "message_guid": message_id,
                    "line_id": convo.line_id,
                }
        elif event_type in ("reaction.added", "reaction.removed"):
            reaction_id = self.uuid().upper()
            event_id = f"chert:reaction:{reaction_id}"
            data["reaction"] = {
                "id": reaction_id,
                "type": self._rng.choice(_REACTIONS),
                "message_id": convo.last_message_id or self.uuid().upper(),
                "sender_handle": lead,
            }
        else:
            event_id = f"chert:event:{self.uuid()}"
        envelope: dict[str, Any] = {
            "event": event_type,
            "event_id": event_id,
            "timestamp": timestamp,
            "api_version": "v1",
            "webhook_version": "2026-05-04",
            "event_type": event_type,
            "trace_id": self.hex(16),
            "partner_id": tenant,
            "data": data,
        }
        envelope.update(extra)
        return {
            "event_id": event_id,
            "lead_id": convo.lead_id,
            "convo_id": convo.convo_id,
            "payload": envelope,
        }

    def pick_type(self, types: tuple[str, ...] | None = None) -> str:
        """A random event type: uniform over ``types``, or by the default weights."""
        if types:
            return self._rng.choice(types)
        names = list(DEFAULT_WEIGHTS)
        return self._rng.choices(names, weights=[DEFAULT_WEIGHTS[n] for n in names])[0]
