"""The package's shape: stages as sub-packages, no import cycles, Lua only in files, and
nothing taken from aiohttp that it does not export."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from collections.abc import Callable
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


# --- on public ground: what relay/ may take from aiohttp --------------------------------
#
# Only what aiohttp exports: names in the __all__ of the modules below, never a module
# or attribute of its internals (``aiohttp.base_protocol``, ``aiohttp.streams``,
# ``aiohttp.web_protocol``, ``aiohttp._http_parser``, ``obj._parser``…), nor a class of
# its to subclass. A patch release may change those without a word (issue 22: names the
# receiver used in aiohttp 3.14.5 were in neither 3.14.3 nor aiohttp's main branch).

# The modules aiohttp documents, and aiohttp.http, whose __all__ exports its parser.
AIOHTTP_PUBLIC_MODULES = frozenset(
    {"aiohttp", "aiohttp.web", "aiohttp.http", "aiohttp.abc", "aiohttp.hdrs"}
)

_PARSER_ERRORS = (
    "raised by the parser aiohttp exports (aiohttp.http.HttpRequestParser), which exports "
    "only their base (HttpProcessingError); they tell why a request was refused "
    "(http_types.refusal: the reason label), and tests/ingest/test_http_server.py pins "
    "each to a request that raises it"
)

# Names relay/ takes from aiohttp outside the rule above, each with its reason.
AIOHTTP_ALLOWED: dict[str, str] = {
    "aiohttp.http_exceptions.BadStatusLine": _PARSER_ERRORS,
    "aiohttp.http_exceptions.InvalidHeader": _PARSER_ERRORS,
    "aiohttp.http_exceptions.InvalidURLError": _PARSER_ERRORS,
    "aiohttp.http_exceptions.LineTooLong": _PARSER_ERRORS,
}


def _aiohttp_private_names() -> frozenset[str]:
    """Every ``_name`` in aiohttp's sources (attributes, methods, slots, modules)."""
    spec = importlib.util.find_spec("aiohttp")
    assert spec is not None
    assert spec.origin is not None
    names: set[str] = set()
    for path in Path(spec.origin).parent.rglob("*"):
        if path.suffix in (".py", ".pyx", ".pxd", ".pxi"):
            names.update(re.findall(r"\b(_[A-Za-z]\w*)", path.read_text(errors="replace")))
    return frozenset(n for n in names if not n.startswith("__"))


def _public(module: str, name: str | None = None) -> bool:
    """Whether ``module`` (or ``name`` in it) is something aiohttp exports."""
    if name is not None and f"{module}.{name}" in AIOHTTP_PUBLIC_MODULES:
        return True  # a public submodule: ``from aiohttp import web``
    if module not in AIOHTTP_PUBLIC_MODULES:
        return False
    if name is None:
        return True
    exported = getattr(importlib.import_module(module), "__all__", None)
    return name in exported if exported is not None else not name.startswith("_")


def _own_private_names(tree: ast.Module) -> set[str]:
    """The ``_names`` a module defines itself: functions, classes, slots, names it
    binds, attributes it sets on ``self`` or ``cls``."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.alias):
            own.add(node.asname or node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            own.add(node.attr)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            own.update(
                c.value
                for c in ast.walk(node.value)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            )
    return {n for n in own if n.startswith("_")}


# Named tuples' own API (``_replace``, ``_asdict``…): public, underscore and all.
_NAMEDTUPLE_API = frozenset({"_asdict", "_field_defaults", "_fields", "_make", "_replace"})


def _aiohttp_imports(
    tree: ast.Module, bad: Callable[[ast.AST, str], None]
) -> tuple[dict[str, str], dict[str, str]]:
    """Checks the module's imports from aiohttp; returns the local names bound to
    aiohttp modules and to other aiohttp names, with what they are bound to."""
    modules: dict[str, str] = {}
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "aiohttp":
                    continue
                if not _public(alias.name):
                    bad(node, f"{alias.name} (import)")
                local = alias.asname or alias.name.split(".")[0]
                modules[local] = alias.name if alias.asname else "aiohttp"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "aiohttp":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if not _public(node.module, alias.name):
                    bad(node, f"{full} (import)")
                bound = modules if full in AIOHTTP_PUBLIC_MODULES else names
                bound[alias.asname or alias.name] = full
    return modules, names


def _attribute_name(node: ast.AST) -> str | None:
    """The attribute ``node`` reads or sets: ``x._name``, or ``getattr(x, "_name")``."""
    if isinstance(node, ast.Attribute):
        return node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None


def aiohttp_private_uses(where: str, source: str, private: frozenset[str]) -> list[str]:
    """Each place in ``source`` that takes from aiohttp what it does not export."""
    tree = ast.parse(source)
    found: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        if what.split(" ", 1)[0] not in AIOHTTP_ALLOWED:
            found.append(f"{where}:{getattr(node, 'lineno', '?')}: {what}")

    modules, names = _aiohttp_imports(tree, bad)
    own = _own_private_names(tree) | _NAMEDTUPLE_API
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = modules.get(node.value.id)
            if module is not None and not _public(module, node.attr):
                bad(node, f"{module}.{node.attr}")
        attr = _attribute_name(node)
        if attr is not None and attr in private and attr not in own:
            bad(node, f".{attr} (a private attribute of aiohttp's)")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and (root.id in names or root.id in modules):
                    what = names.get(root.id) if root is base else ast.unparse(base)
                    bad(node, f"{what} (subclassed: its private state comes with it)")
    return found


def test_relay_takes_from_aiohttp_only_what_it_exports() -> None:
    private = _aiohttp_private_names()
    found = [
        use
        for path in sorted(ROOT.rglob("*.py"))
        for use in aiohttp_private_uses(
            str(path.relative_to(ROOT.parent)), path.read_text(), private
        )
    ]
    assert found == [], "\n".join(found)


def test_every_aiohttp_exception_allowed_is_still_used_and_still_there() -> None:
    sources = "\n".join(p.read_text() for p in ROOT.rglob("*.py"))
    for dotted in AIOHTTP_ALLOWED:
        module, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), dotted
        assert re.search(rf"\b{name}\b", sources), f"{dotted} is allowed but not used"


@pytest.mark.parametrize(
    "source",
    [
        "from aiohttp.base_protocol import BaseProtocol",
        "from aiohttp.streams import StreamReader",
        "from aiohttp.web_protocol import RequestPayloadError",
        "from aiohttp.http_parser import HttpRequestParser",
        "from aiohttp import _http_parser",
        "import aiohttp.streams",
        "import aiohttp\nx = aiohttp.streams.EMPTY_PAYLOAD",
        "from aiohttp import web\nx = web.web_protocol",
        "from aiohttp.http import HttpRequestParser\nclass P(HttpRequestParser): pass",
        "import aiohttp\nclass P(aiohttp.StreamReader): pass",
        "def f(conn):\n    conn._srv._connections.discard(conn)",
        "def f(p):\n    if not p._reading_paused:\n        p._parser.pause_reading()",
        "def f(p):\n    return getattr(p, '_upgraded')",
    ],
)
def test_the_aiohttp_guard_catches_what_it_is_for(source: str) -> None:
    assert aiohttp_private_uses("example.py", source, _aiohttp_private_names()) != []


def test_the_aiohttp_guard_lets_a_module_s_own_private_names_be() -> None:
    source = (
        "from aiohttp import StreamReader, web\n"
        "from aiohttp.http import HttpRequestParser\n"
        "class C:\n"
        "    __slots__ = ('_parser', '_paused')\n"
        "    def __init__(self):\n"
        "        self._parser = None\n"
        "        self._loop = None\n"
        "    def _next(self):\n"
        "        return self._parser, self._paused, self._loop, web.Response\n"
    )
    assert aiohttp_private_uses("example.py", source, _aiohttp_private_names()) == []
