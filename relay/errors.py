"""The relay's exceptions and process exit codes.

Every error the relay raises on purpose is a :class:`RelayError`; its children say
what kind of fault it is, so callers branch on meaning rather than on message text.
"""

from __future__ import annotations

# Process exit codes (sysexits.h where one fits). systemd units use
# ``RestartPreventExitStatus=78`` so a bad configuration does not restart-loop.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # Redis (or another dependency) could not be reached at start-up
EXIT_CONFIG = 78  # the configuration, or the Redis it points at, is unsafe or invalid


class RelayError(Exception):
    """Root of every error the relay raises deliberately."""


class ConfigError(RelayError):
    """The configuration is invalid. ``problems`` lists ``(key path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} configuration problem(s){where}:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class UnsafeRedisError(RelayError):
    """The Redis server's settings could lose acknowledged events (e.g. key eviction)."""


class RedisUnavailableError(RelayError):
    """Redis could not be reached or did not answer in time; the caller may retry."""


class EmbeddedRedisError(RelayError):
    """The private redis-server could not be started."""


class UpstreamError(RelayError):
    """Chert answered with an error or could not be reached."""


class ChertApiError(UpstreamError):
    """Chert answered a call with an error (its envelope parsed, chert-contract.md §6).

    ``code`` is Chert's numeric error code (0 when the answer had no envelope),
    ``retry_after`` the seconds Chert asked us to wait (body or ``Retry-After``), and
    ``trace_id`` Chert's trace id for support requests. Never carries a secret.
    """

    # Codes meaning our credentials or tenant are wrong: retrying soon cannot help.
    AUTH_CODES = frozenset({2001, 2004, 2005, 2012, 2013})

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.trace_id = trace_id
        super().__init__(f"Chert answered {status} (code {code}): {message}")

    @property
    def is_auth(self) -> bool:
        """Credentials rejected, tenant unknown or forbidden (401/403/404 or an auth code)."""
        return self.code in self.AUTH_CODES or (self.status in (401, 403) and not self.retryable)


class ChertUnreachableError(UpstreamError):
    """Chert could not be reached, or did not answer in time (always retryable)."""


class DeadLetterError(RelayError):
    """A dead-letter operation was refused (unknown tenant or sink, no such entry…)."""


class SignatureError(RelayError):
    """A webhook's signature did not verify. ``reason`` is a short, stable label
    (``missing``, ``malformed``, ``stale``, ``future``, ``mismatch``) used in logs and
    metrics; it never includes the secret or the expected digest."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)
