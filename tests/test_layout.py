"""The package's shape: stages as sub-packages, no import cycles, Lua only in files."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from relay.store import scripts

ROOT = Path(__file__).resolve().parent.parent / "relay"
STAGES = ("store", "ingest", "delivery", "upstream", "admin", "simulator")
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Relay modules ``path`` imports when it is loaded (not in functions or TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known}


def test_every_stage_is_a_sub_package() -> None:
    for stage in STAGES:
        assert (ROOT / stage / "__init__.py").is_file(), stage


def test_there_is_no_import_cycle() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(p, known) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package importing its own module is no cycle
                continue
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_lua_lives_in_a_python_string() -> None:
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "redis.call" not in node.value, f"{path}: Lua belongs in store/lua/"


def test_long_modules_say_why() -> None:
    for path in ROOT.rglob("*.py"):
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one role" in doc, f"{path} has {lines} lines and no word on why"


@pytest.mark.parametrize("name", scripts.names())
def test_each_script_header_names_what_it_uses(name: str) -> None:
    lua = scripts.script(name)
    body = lua.body[lua.body.index("]]") :]
    header = lua.header
    assert header.summary.startswith(f"{name}:")
    for ref in {int(n) for n in _indexes(body, "KEYS")}:
        assert ref <= len(header.keys), f"{name}: KEYS[{ref}] is not in the header"
    for ref in {int(n) for n in _indexes(body, "ARGV")}:
        assert header.rest is not None, f"{name}: ARGV[{ref}] is not in the header"
        assert ref >= header.rest, f"{name}: ARGV[{ref}] is not in the header's variable tail"

    for used in set(re.findall(r"\bK\.(\w+)", body)):
        assert used in header.keys, f"{name}: K.{used} is not a key in the header"
    for used in set(re.findall(r"\bA\.(\w+)", body)):
        assert used in header.argv, f"{name}: A.{used} is not an argument in the header"


def _indexes(body: str, table: str) -> list[str]:
    return re.findall(rf"\b{table}\[(\d+)\]", body)


async def test_every_script_compiles_in_redis(redis_url: str) -> None:
    from redis.asyncio import Redis

    client: Redis = Redis.from_url(redis_url)
    try:
        for name in scripts.names():
            sha = await client.script_load(scripts.script(name).source)
            assert sha == scripts.script(name).sha
    finally:
        await client.aclose()
