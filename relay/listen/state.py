"""The listen state directory: the cursor (watermark and handled ids) and the whsec_ secret."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import EXIT_TEMPFAIL, StateDirError

log = logging.getLogger(__name__)

OVERLAP_S = 60.0  # a restart or reconnect re-reads this much before the watermark


class StateDirInUseError(StateDirError):
    """Another ``listen`` holds this state directory's lock."""

    exit_code = EXIT_TEMPFAIL


def default_state_dir(tenant: str, environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "chert-relay" / "listen" / tenant


# --- the state directory ------------------------------------------------------------------


@dataclass
class ListenState:
    """The cursor and the secret, in one directory."""

    directory: Path
    watermark: float | None = None
    started: float | None = None  # the first run's start: older events are not forwarded
    forwarded: dict[str, float] = field(default_factory=dict)  # event id -> created_at
    secret: str = ""

    @property
    def _file(self) -> Path:
        return self.directory / "state.json"

    @classmethod
    def open(cls, directory: Path) -> ListenState:
        """Read (or create) the state directory's cursor and secret."""
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            state = cls(directory)
            state.secret = state._load_secret()
            state._load_cursor()
        except OSError as e:
            raise StateDirError(
                f"the listen state directory {directory} cannot be used: {e.strerror or e}"
            ) from None
        return state

    def _load_secret(self) -> str:
        path = self.directory / "secret"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            text = ""
        if text.startswith("whsec_"):
            return text
        text = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        return text

    def _load_cursor(self) -> None:
        try:
            obj = json.loads(self._file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except ValueError:
            log.warning("%s is not valid JSON; starting from now", self._file)
            return
        if not isinstance(obj, dict):
            return
        wm = obj.get("watermark")
        if isinstance(wm, int | float) and not isinstance(wm, bool):
            self.watermark = float(wm)
        first = obj.get("started")
        if isinstance(first, int | float) and not isinstance(first, bool):
            self.started = float(first)
        seen = obj.get("forwarded")
        if isinstance(seen, dict):
            self.forwarded = {
                str(k): float(v)
                for k, v in seen.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }

    def start_now(self) -> None:
        """The first run: events from now on (a restart resumes from the watermark)."""
        self.started = self.watermark = time.time()
        self.save()

    def handled(self, event_id: str, created: float) -> None:
        """Record an event as done with, and rewrite the file."""
        self.forwarded[event_id] = created
        if self.watermark is None or created > self.watermark:
            self.watermark = created
        floor = self.watermark - 2 * OVERLAP_S
        self.forwarded = {k: v for k, v in self.forwarded.items() if v >= floor}
        self.save()

    def save(self) -> None:
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"started": self.started, "watermark": self.watermark, "forwarded": self.forwarded}
            ),
            encoding="utf-8",
        )
        os.replace(tmp, self._file)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock: a second ``listen`` on it is refused."""
        with open(self.directory / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateDirInUseError(
                    f"another chert-relay listen is using {self.directory} "
                    "(stop it, or pass --state-dir)"
                ) from None
            yield
