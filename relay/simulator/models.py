"""The simulator's plain data: tenants, fault switches, and the records it keeps.

Everything here is a small mutable dataclass so tests (and the control API) can
read and change it directly; changing a :class:`Faults` field takes effect at once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

DELIVERY_STATUSES = ("pending", "delivered", "failed", "dev_inbox")


@dataclass
class SimTenant:
    """One simulated Chert tenant and its (single) webhook subscription.

    ``webhook_url`` ``None`` means the tenant has no webhook destination: its events
    are logged with delivery status ``dev_inbox`` and never pushed.
    """

    slug: str
    api_secret: str
    webhook_secret: str
    webhook_url: str | None = None
    legacy_signature: bool = False
    subscription_id: str = ""

    def __post_init__(self) -> None:
        if not self.subscription_id:
            digest = hashlib.sha256(self.slug.encode()).hexdigest()[:20]
            self.subscription_id = f"sub_{digest}"


@dataclass
class Faults:
    """Faults injected on demand. Read at the moment each decision is made."""

    webhooks_enabled: bool = True  # False: push nothing (rows stay "pending")
    drop_rate: float = 0.0  # share of pushes silently not sent (row "failed")
    duplicate_rate: float = 0.0  # share of pushes sent twice
    reorder: bool = False  # shuffle each batch and hold pushes back at random
    reorder_window: float = 0.25  # longest random hold-back while reorder is on, seconds
    delay: float = 0.0  # seconds before each push
    api_429: int = 0  # answer the next N API calls 429 / 1007 with retry_after
    api_retry_after: float = 1.0  # retry_after of those answers, seconds
    api_500: int = 0  # answer the next N API calls 500 / 3001
    legacy_signature: bool = False  # sign every push in the legacy x-chert-signature format

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` after validating all of them; raises ``ValueError``."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            current = getattr(self, name, None) if name in _FAULT_FIELDS else None
            if current is None:
                raise ValueError(f"unknown fault {name!r}")
            checked[name] = _check_fault(name, value, current)
        for name, value in checked.items():
            setattr(self, name, value)


_FAULT_FIELDS = {f.name for f in fields(Faults)}


def _check_fault(name: str, value: object, current: object) -> object:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} is true or false")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} is a whole number >= 0")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} is a number")
    number = float(value)
    if name.endswith("_rate") and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} is a share between 0 and 1")
    if number < 0:
        raise ValueError(f"{name} cannot be negative")
    return number


@dataclass
class ApiRequest:
    """One request to the simulated events API, recorded when it arrives.

    ``status`` is filled in once the answer is chosen (0 until then); for a stream
    it is set before the first byte is sent.
    """

    method: str
    path: str
    query: dict[str, str]
    time: float  # time.time() on arrival
    tenant: str | None = None  # the authenticated tenant, or the one claimed
    status: int = 0
    code: int | None = None  # Chert error code of an error answer


@dataclass
class WebhookAttempt:
    """One webhook push attempt (or a push the ``drop_rate`` fault swallowed).

    Exactly one of ``status`` (the HTTP status answered) and ``error`` is set;
    ``error`` is ``"dropped"`` for a dropped push, otherwise the connection error.
    """

    tenant: str
    event_id: str
    log_id: str
    attempt: int  # 1..3 within one push
    time: float  # time.time() when the attempt started
    status: int | None = None
    error: str | None = None
    duration_ms: int = 0
    copy: int = 0  # 1 for the second copy a duplicate_rate fault sent
    replay: bool = False  # sent by POST /events/{id}/replay

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def iso_ms(ms: int) -> str:
    """``2026-05-24T01:35:34.123Z`` from unix milliseconds."""
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_iso_us(value: str) -> int:
    """Unix microseconds from an ISO-8601 time (``Z`` or an offset; naive means UTC)."""
    dt = datetime.fromisoformat(value.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
