"""The relay's Lua scripts: one file each in ``lua/``, composed and loaded here only.

Every script opens with a header that names its KEYS and ARGV, one per line, and the
shared functions it uses::

    --[[ claim: what it does …
    KEYS
      1 ev          the stored event
      2 attempts    the delivery's record
    ARGV
      1 now         Unix ms
      2... ids      the rest of ARGV
    uses: stored_event breaker
    flags: allow-oom
    ]]

A ``flags:`` line gives the script Redis' script flags (``#!lua flags=…``): the
scripts that let a backlog drain — take, finish, renew, release, reschedule, purge —
are ``allow-oom``, so that a Redis at ``maxmemory`` (which refuses ingest) still
delivers, and so frees memory; ingest has no flag and is refused there.

The loader puts in front of the body, once each, the shared functions it uses
(``lua/lib/<name>.lua``, or ``keys``: the key segments of :mod:`relay.keys` as the table
``KEY``, the job function's name as ``JOB_FUNCTION`` and arq's key prefixes as
``JOB_KEY_PREFIX``, ``RETRY_KEY_PREFIX`` and ``IN_PROGRESS_KEY_PREFIX``), then two
tables that name the
KEYS and ARGV by the header: ``K.ev`` is ``KEYS[1]``, ``A.now`` is ``ARGV[1]``. A
``2...`` entry names where a variable tail of ARGV starts; the body reads it from
``ARGV`` itself. Python calls a script with its keys and arguments by the same names
(:meth:`BoundScript.__call__`), so a script and its callers cannot drift apart.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from arq.constants import in_progress_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from relay.keys import JOB_KEY_PREFIX, SEGMENTS
from relay.store.jobs import DELIVER_FUNCTION

_ENTRY = re.compile(r"^\s+(\d+)(\.\.\.)?\s+(\w+)\b")
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_FLAGS = {"allow-oom", "no-writes", "allow-stale"}


def library(name: str) -> str:
    """The shared functions ``lua/lib/<name>.lua`` (or the generated ``keys``)."""
    if name == "keys":
        table = ", ".join(f"{k} = '{v}'" for k, v in SEGMENTS.items())
        return (
            "-- generated from relay/keys.py and relay/store/jobs.py\n"
            f"local KEY = {{{table}}}\n"
            f"local JOB_FUNCTION = '{DELIVER_FUNCTION}'\n"
            f"local JOB_KEY_PREFIX = '{JOB_KEY_PREFIX}'\n"
            f"local RETRY_KEY_PREFIX = '{retry_key_prefix}'\n"
            f"local IN_PROGRESS_KEY_PREFIX = '{in_progress_key_prefix}'\n"
        )
    return _read(f"lib/{name}.lua")


def _read(path: str) -> str:
    return resources.files("relay.store").joinpath("lua", path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Header:
    """What a script's header says: its KEYS and ARGV names and the functions it uses."""

    summary: str
    keys: tuple[str, ...]
    argv: tuple[str, ...]
    rest: int | None  # where a variable tail of ARGV starts (1-based), if it has one
    uses: tuple[str, ...]
    flags: tuple[str, ...] = ()  # Redis script flags (``#!lua flags=…``), e.g. allow-oom


def parse_header(name: str, text: str) -> Header:
    """Read the ``--[[ … ]]`` header of ``text``; ``ValueError`` if it is malformed."""
    if not text.startswith("--[["):
        raise ValueError(f"{name}.lua: no --[[ header ]] at the top")
    head = text[4 : text.index("]]")]
    lines = head.splitlines()
    summary = lines[0].strip()
    found: dict[str, list[str]] = {"KEYS": [], "ARGV": []}
    rest: int | None = None
    uses: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    section: str | None = None
    for line in lines[1:]:
        word = line.split()[0] if line.split() else ""
        if word in found and not line.startswith(" "):
            section = word
            continue
        if line.startswith("uses:"):
            uses = tuple(line.removeprefix("uses:").split())
            section = None
            continue
        if line.startswith("flags:"):
            flags = tuple(line.removeprefix("flags:").split())
            unknown = set(flags) - _FLAGS
            if unknown:
                raise ValueError(f"{name}.lua: unknown script flag(s) {sorted(unknown)}")
            section = None
            continue
        m = _ENTRY.match(line)
        if m is None or section is None:
            continue
        number, tail, entry = int(m.group(1)), m.group(2), m.group(3)
        names = found[section]
        if number != len(names) + 1 or (section == "ARGV" and rest is not None):
            raise ValueError(f"{name}.lua: {section} entry {number} {entry} is out of order")
        if tail:
            if section != "ARGV":
                raise ValueError(f"{name}.lua: only ARGV may end in a variable tail")
            rest = number
        if not _NAME.match(entry):
            raise ValueError(f"{name}.lua: {entry!r} is not a usable name")
        names.append(entry)
    argv = found["ARGV"][:-1] if rest is not None else found["ARGV"]
    return Header(summary, tuple(found["KEYS"]), tuple(argv), rest, uses, flags)


@dataclass(frozen=True)
class LuaScript:
    """One script, composed with the shared functions it uses."""

    name: str
    header: Header
    body: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 - Redis' id

    def ordered_keys(self, keys: Mapping[str, Any]) -> list[Any]:
        """``keys`` by name, in the header's order."""
        if len(keys) != len(self.header.keys):
            raise TypeError(f"{self.name}: keys {sorted(keys)} != {list(self.header.keys)}")
        return [keys[k] for k in self.header.keys]

    def ordered_args(self, args: Mapping[str, Any], rest: Sequence[Any] = ()) -> list[Any]:
        """``args`` by name, in the header's order, then ``rest`` (the variable tail)."""
        if len(args) != len(self.header.argv):
            raise TypeError(f"{self.name}: args {sorted(args)} != {list(self.header.argv)}")
        if rest and self.header.rest is None:
            raise TypeError(f"{self.name}: takes no variable tail of ARGV")
        return [*(args[a] for a in self.header.argv), *rest]

    def bind(self, client: Redis) -> BoundScript:
        return BoundScript(self, client)


def _compose(name: str, header: Header, body: str) -> str:
    parts: list[str] = []
    done: set[str] = set()

    def add(lib: str) -> None:
        if lib in done:
            return
        done.add(lib)
        text = library(lib)
        if lib != "keys":
            for dep in parse_header(lib, text).uses:
                add(dep)
        parts.append(text)

    for lib in header.uses:
        add(lib)
    k = ", ".join(f"{n} = KEYS[{i}]" for i, n in enumerate(header.keys, 1))
    a = ", ".join(f"{n} = ARGV[{i}]" for i, n in enumerate(header.argv, 1))
    parts.append(f"local K = {{{k}}}\nlocal A = {{{a}}}\n")
    parts.append(body)
    source = "\n".join(parts)
    if header.flags:
        # A shebang declares the script's flags; it must be the source's first line.
        return f"#!lua flags={','.join(header.flags)}\n{source}"
    return source


@functools.cache
def script(name: str) -> LuaScript:
    """The script ``lua/<name>.lua``, composed (read once per process)."""
    body = _read(f"{name}.lua")
    header = parse_header(name, body)
    return LuaScript(name, header, body, _compose(name, header, body))


def names() -> list[str]:
    """Every script's name (not the shared functions)."""
    folder = resources.files("relay.store").joinpath("lua")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


class BoundScript:
    """A script registered on one client: ``await s(keys={…}, args={…})`` by name."""

    def __init__(self, lua: LuaScript, client: Redis) -> None:
        self.lua = lua
        self._script: AsyncScript = client.register_script(lua.source)

    async def __call__(
        self,
        keys: Mapping[str, Any],
        args: Mapping[str, Any],
        *,
        rest: Sequence[Any] = (),
        client: Redis | Pipeline | None = None,
    ) -> Any:
        return await self._script(
            keys=self.lua.ordered_keys(keys),
            args=self.lua.ordered_args(args, rest),
            client=client,
        )
