"""A local Chert stand-in for tests and for trying the relay (``chert-relay simulate``).

It speaks chert-contract.md: signed webhooks with Chert's retry rule, the events
API with Chert's auth and error envelope, the SSE stream, and a ``/_sim`` control
API for injecting faults. See :class:`Simulator`.
"""

from relay.simulator.models import ApiRequest, Faults, SimTenant, WebhookAttempt
from relay.simulator.server import Simulator

__all__ = ["ApiRequest", "Faults", "SimTenant", "Simulator", "WebhookAttempt"]
