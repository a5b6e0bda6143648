"""External tools some tests drive: found on PATH or beside the test run's Python (where
``make venv-dev`` puts promtool), and a clear failure — not a skip — when missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HOW = {
    "promtool": "`make setup` (it takes promtool from Debian's prometheus package)",
    "systemd-analyze": "`apt-get install systemd`",
    "chromium": "`make deps` (Debian's chromium package)",
    "tinyproxy": "`make deps` (Debian's tinyproxy-bin package)",
}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        beside = Path(sys.executable).parent / name
        found = str(beside) if beside.exists() else None
    if found is None:
        pytest.fail(f"{name} is needed: {HOW.get(name, 'install it')}", pytrace=False)
    return found
