"""The relay's exceptions and process exit codes.

Every error the relay raises on purpose is a :class:`RelayError`; its children say
what kind of fault it is, so callers branch on meaning rather than on message text.
A failure that stops the daemon from starting carries its exit code
(:attr:`RelayError.exit_code`); the CLI prints it as one line and exits with it.
"""

from __future__ import annotations

import errno
from typing import ClassVar

# Process exit codes (sysexits.h). The systemd units list those a restart cannot fix in
# ``RestartPreventExitStatus=`` (see RESTART_CANNOT_FIX), so they do not restart-loop.
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected failure (a bug): logged with its traceback
EXIT_USAGE = 2  # a bad command line
EXIT_UNAVAILABLE = 69  # Redis unreachable, or the embedded redis-server would not start
EXIT_OSERR = 71  # a listen address cannot be used for another reason (not on this host…)
EXIT_OSFILE = 72  # the embedded default's redis-server is not installed
EXIT_CANTCREAT = 73  # the state directory cannot be created or written
EXIT_TEMPFAIL = 75  # a listen address (or the embedded Redis' socket) is in use
EXIT_NOPERM = 77  # a listen address is not permitted (a port below 1024, a socket path)
EXIT_CONFIG = 78  # the configuration, or the Redis it points at, is unsafe or invalid

RESTART_CANNOT_FIX = (EXIT_USAGE, EXIT_OSFILE, EXIT_CANTCREAT, EXIT_NOPERM, EXIT_CONFIG)


class RelayError(Exception):
    """Root of every error the relay raises deliberately."""

    exit_code: ClassVar[int | None] = None  # set where the error stops the daemon starting


class ConfigError(RelayError):
    """The configuration is invalid. ``problems`` lists ``(key path, message)`` pairs."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} configuration problem(s){where}:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))

    def one_line(self) -> str:
        where = f" in {self.source}" if self.source else ""
        listed = "; ".join(f"{path or '<root>'}: {msg}" for path, msg in self.problems)
        return f"{len(self.problems)} configuration problem(s){where}: {listed}"


class UnsafeRedisError(RelayError):
    """The Redis server's settings could lose acknowledged events (e.g. key eviction)."""

    exit_code = EXIT_CONFIG


class RedisUnavailableError(RelayError):
    """Redis could not be reached or did not answer in time; the caller may retry."""

    exit_code = EXIT_UNAVAILABLE


class EmbeddedRedisError(RelayError):
    """The private redis-server could not be started."""

    exit_code = EXIT_UNAVAILABLE


class RedisServerMissingError(EmbeddedRedisError):
    """The embedded default needs ``redis-server``, and it is not installed."""

    exit_code = EXIT_OSFILE


class ForeignStateError(RelayError):
    """Root was asked to start the embedded redis-server on another user's state."""

    exit_code = EXIT_NOPERM


class EmbeddedRedisInUseError(EmbeddedRedisError):
    """Another process already runs the embedded redis-server of this state directory."""

    exit_code = EXIT_TEMPFAIL


class StateDirError(RelayError):
    """The state directory (``relay.state_dir``) cannot be created or written."""

    exit_code = EXIT_CANTCREAT


class ListenError(RelayError):
    """A listener could not be opened; the exit code says whether a restart may help."""

    def __init__(self, what: str, address: str, error: OSError) -> None:
        self.address = address
        self.errno = error.errno
        if error.errno == errno.EADDRINUSE:
            why = "is in use (another chert-relay, or a stale process?)"
        elif error.errno in (errno.EACCES, errno.EPERM):
            why = "is not permitted (a port below 1024 needs CAP_NET_BIND_SERVICE)"
        else:
            why = f"cannot be used: {error.strerror or error}"
        super().__init__(f"the {what} listen address {address} {why}")

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        if self.errno == errno.EADDRINUSE:
            return EXIT_TEMPFAIL
        if self.errno in (errno.EACCES, errno.EPERM):
            return EXIT_NOPERM
        return EXIT_OSERR


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


class EventLogError(RelayError):
    """An event-log request was refused (unknown tenant or sink, no such record, a bad
    filter or cursor…)."""


class SignatureError(RelayError):
    """A webhook's signature did not verify. ``reason`` is a short, stable label
    (``missing``, ``malformed``, ``stale``, ``future``, ``mismatch``) used in logs and
    metrics; it never includes the secret or the expected digest."""

    def __init__(self, reason: str, detail: str, skew: float | None = None) -> None:
        self.reason = reason
        self.skew = skew  # now minus the signed timestamp, when it was read
        super().__init__(detail)


class PrivateTarget(OSError):
    """A sink's host name resolves only inward while ``worker.refuse_private_targets``
    is set (relay/delivery/targets.py)."""
