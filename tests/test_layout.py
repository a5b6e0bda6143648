"""The package's shape: stages as sub-packages that import only the stages below them, no
import cycles, Lua only in files, and nothing taken from aiohttp that it does not export."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.store import scripts

ROOT = Path(__file__).resolve().parent.parent / "relay"
STAGES = ("store", "ingest", "edge", "delivery", "upstream", "admin", "simulator", "listen")

# The stages each stage may load, directly or through the shared modules around them
# (runtime.py, config/, metrics.py…): the data's way, edge -> ingest -> store <-
# delivery, upstream -> ingest, the admin on top. The simulator stands apart (a Chert
# stand-in), and `chert-relay listen` forwards as the worker does, from Chert's API.
STAGE_MAY_LOAD: dict[str, frozenset[str]] = {
    "store": frozenset(),
    "ingest": frozenset({"store"}),
    "edge": frozenset({"ingest", "store"}),
    "delivery": frozenset({"store"}),
    "upstream": frozenset({"ingest", "store"}),
    "admin": frozenset({"edge", "ingest", "store", "delivery", "upstream"}),
    "simulator": frozenset(),
    "listen": frozenset({"ingest", "store", "delivery", "upstream"}),
}
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


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_every_stage_has_its_place_in_the_order() -> None:
    assert set(STAGE_MAY_LOAD) == set(STAGES)


def test_no_stage_loads_a_stage_above_it() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(p, known) - {m} for m, p in modules.items()}
    wrong: list[str] = []
    for module in sorted(graph):
        stage = _stage(module)
        if stage is None:
            continue
        seen = {module}
        todo = [(module, [module])]
        while todo:  # every module it loads, with the chain that loads it
            current, chain = todo.pop()
            for n in sorted(graph[current] - seen):
                seen.add(n)
                todo.append((n, [*chain, n]))
                other = _stage(n)
                if other not in (None, stage) and other not in STAGE_MAY_LOAD[stage]:
                    wrong.append(" -> ".join([*chain, n]))
    assert not wrong, "a stage loads one above it:\n" + "\n".join(wrong)


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


# What names modules in prose: the package's docstrings and comments, the Lua scripts'
# headers, the README, docs/ and bench/ (not CHANGELOG.md: it is history).
_PROSE = (
    "relay/**/*.py",
    "relay/store/lua/**/*.lua",
    "README.md",
    "docs/*.md",
    "bench/**/*.py",
    "bench/README.md",
)
_PATH_RE = re.compile(r"(?<![\w/.-])(relay/[\w/]+\.(?:py|lua))\b")
_SPHINX_RE = re.compile(r":(?:mod|class|func|meth|data|attr):`~?(relay(?:\.\w+)+)`")

# Known stale names, by (file, name), with why they stand.
_STALE_ALLOWED: dict[tuple[str, str], str] = {}


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for name in parts[k:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_prose_names_only_modules_and_files_that_exist() -> None:
    repo = ROOT.parent
    stale: list[str] = []
    allowed_seen: set[tuple[str, str]] = set()
    for pattern in _PROSE:
        for path in sorted(repo.glob(pattern)):
            file = str(path.relative_to(repo))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                paths = [m for m in _PATH_RE.findall(line) if not (repo / m).exists()]
                names = [m for m in _SPHINX_RE.findall(line) if not _resolves(m)]
                for name in paths + names:
                    if (file, name) in _STALE_ALLOWED:
                        allowed_seen.add((file, name))
                    else:
                        stale.append(f"{file}:{n}: {name}")
    assert not stale, "names of modules or files that do not exist:\n" + "\n".join(stale)
    corrected = set(_STALE_ALLOWED) - allowed_seen
    assert not corrected, f"corrected (take them off _STALE_ALLOWED): {corrected}"


def test_the_readme_and_docs_name_only_lua_scripts_that_exist() -> None:
    repo = ROOT.parent
    lua = ROOT / "store" / "lua"
    scripts_there = {str(p.relative_to(lua)) for p in lua.rglob("*.lua")}
    stale = [
        f"{path.relative_to(repo)}: {name}"
        for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
        for name in re.findall(r"`(?:relay/)?(?:store/)?(?:lua/)?([\w/]+\.lua)`", path.read_text())
        if name not in scripts_there
    ]
    assert not stale, "Lua scripts that do not exist:\n" + "\n".join(stale)


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


# -- No private name of redis, arq or argparse -------------------------------------------

# The libraries whose private names (a leading underscore: ``redis._parsers``,
# ``conn._reader``, ``argparse._SubParsersAction``) relay/ must not touch: they can change
# in any release. The private names are read from the installed libraries' own source, so
# the check follows an upgrade. (``_private_uses(source, libraries)`` serves any library.)
GUARDED_LIBRARIES = ("redis", "arq", "argparse")

# Each exception, by (module, name), with why it stands and what removes it.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {}

# Underscored, but public: namedtuple's API.
_PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_field_defaults", "_make"}


def _is_private(name: str) -> bool:
    return (
        name.startswith("_")
        and name != "_"
        and not (name.startswith("__") and name.endswith("__"))
        and name not in _PUBLIC_UNDERSCORED
    )


def _library_sources(library: str) -> list[Path]:
    spec = importlib.util.find_spec(library)
    assert spec is not None, f"{library} is not installed"
    if spec.submodule_search_locations:
        return sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))
    assert spec.origin is not None
    return [Path(spec.origin)]


@functools.cache
def _library_private_names(libraries: tuple[str, ...]) -> frozenset[str]:
    """Every private name ``libraries`` define or use on their objects."""
    names: set[str] = set()
    for library in libraries:
        for path in _library_sources(library):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    found = node.name
                elif isinstance(node, ast.Attribute):
                    found = node.attr
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    found = node.id
                else:
                    continue
                if _is_private(found):
                    names.add(found)
    return frozenset(names)


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _defined_by(cls: ast.ClassDef) -> set[str]:
    """The private names a class defines: its methods and class attributes, and what its
    methods assign on ``self``/``cls``."""
    names: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if _is_private(n)}


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, ast.expr]:
    a = node.args
    every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
    return {p.arg: p.annotation for p in every if p.annotation is not None}


def _attribute_types(cls: ast.ClassDef) -> dict[str, ast.expr]:
    """The declared types of a class's attributes: annotated (``x: T``, ``self.x: T``)
    or assigned from an annotated parameter (``self.x = x``)."""
    found: dict[str, ast.expr] = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            found[statement.target.id] = statement.annotation
    for method in cls.body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        params = _params(method)
        for step in ast.walk(method):
            target: ast.expr
            if isinstance(step, ast.AnnAssign):
                target, annotation = step.target, step.annotation
            elif isinstance(step, ast.Assign) and len(step.targets) == 1:
                target, source = step.targets[0], step.value
                if not (isinstance(source, ast.Name) and source.id in params):
                    continue
                annotation = params[source.id]
            else:
                continue
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                found[target.attr] = annotation
    return found


class _PrivateUses(ast.NodeVisitor):
    """Finds, in one module, each use of a guarded library's private name:

    - an import of one (``from redis._parsers.base import …``, ``from arq.x import _y``);
    - an attribute reached through one of its modules (``argparse._SubParsersAction``);
    - any private attribute of a value whose declared type is one of its classes (a
      parameter, variable or attribute annotated so: ``conn: AbstractConnection`` →
      ``conn._reader``); a value declared as another type is not its object;
    - an attribute (or ``getattr`` name) that is one of its private names, on a value
      of undeclared type (``parser._actions``), or on ``self`` in a class built directly
      on one of its classes (arq's ``Worker``). A class of relay's own may use its own
      private names, on ``self`` or on another of its kind (``other._value``).
    """

    def __init__(self, libraries: tuple[str, ...]) -> None:
        self.libraries = libraries
        self.private = _library_private_names(libraries)
        self.modules: set[str] = set()  # local names bound to a guarded library's modules
        self.imported: set[str] = set()  # local names imported from one
        # enclosing classes: (built on a library's class?, names it defines, attribute types)
        self.classes: list[tuple[bool, set[str], dict[str, ast.expr]]] = []
        self.scopes: list[dict[str, ast.expr]] = [{}]  # per function: declared types
        self.found: list[tuple[int, str, str]] = []

    def _guarded(self, module: str) -> bool:
        return module.split(".")[0] in self.libraries

    def _add(self, node: ast.AST, name: str, what: str) -> None:
        self.found.append((getattr(node, "lineno", 0), name, what))

    def _library_type(self, annotation: ast.expr) -> bool:
        names = self.modules | self.imported
        return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(annotation))

    def _declared(self, target: ast.expr) -> ast.expr | None:
        """The declared type of ``target``, if it has one in view."""
        if isinstance(target, ast.Name):
            return self.scopes[-1].get(target.id)
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and self.classes
        ):
            return self.classes[-1][2].get(target.attr)
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._guarded(alias.name):
                self.modules.add(alias.asname or alias.name.split(".")[0])
                for part in filter(_is_private, alias.name.split(".")):
                    self._add(node, part, f"imports {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not node.module or not self._guarded(node.module):
            return
        for part in filter(_is_private, node.module.split(".")):
            self._add(node, part, f"imports from {node.module}")
        for alias in node.names:
            self.imported.add(alias.asname or alias.name)
            if _is_private(alias.name):
                self._add(node, alias.name, f"imports {alias.name} from {node.module}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        names = self.modules | self.imported
        on_library = any(isinstance(r, ast.Name) and r.id in names for r in map(_root, node.bases))
        self.classes.append((on_library, _defined_by(node), _attribute_types(node)))
        self.generic_visit(node)
        self.classes.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scopes.append(_params(node))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.scopes[-1][node.target.id] = node.annotation
        self.generic_visit(node)

    def _check(self, node: ast.AST, target: ast.expr, name: str, what: str) -> None:
        declared = self._declared(target)
        if declared is not None:
            if self._library_type(declared):
                self._add(node, name, f"{what}: a private name of a library's object")
            return  # another type's object: not the guarded libraries'
        if name not in self.private:
            return
        if self.classes:
            on_library, defines, _ = self.classes[-1]
            on_self = isinstance(target, ast.Name) and target.id in ("self", "cls")
            if (on_self or name in defines) and not on_library:
                return  # the class's own
        self._add(node, name, f"{what}: a library's private name")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_private(node.attr):
            root = _root(node.value)
            if isinstance(root, ast.Name) and root.id in self.modules:
                self._add(node, node.attr, f"{ast.unparse(node)}: a private name")
            else:
                self._check(node, node.value, node.attr, ast.unparse(node))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func, args = node.func, node.args
        if (
            isinstance(func, ast.Name)
            and func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(args) >= 2
            and isinstance(args[1], ast.Constant)
            and isinstance(args[1].value, str)
            and _is_private(args[1].value)
        ):
            self._check(node, args[0], args[1].value, ast.unparse(node))
        self.generic_visit(node)


def _private_uses(
    source: str, libraries: tuple[str, ...] = GUARDED_LIBRARIES
) -> list[tuple[int, str, str]]:
    """(line, name, what) for each use in ``source`` of a private name of ``libraries``."""
    finder = _PrivateUses(libraries)
    finder.visit(ast.parse(source))
    return finder.found


def test_relay_uses_no_private_name_of_redis_arq_or_argparse() -> None:
    unexpected: list[str] = []
    allowed_seen: set[tuple[str, str]] = set()
    for path in sorted(ROOT.rglob("*.py")):
        module = str(path.relative_to(ROOT.parent))
        for line, name, what in _private_uses(path.read_text()):
            if (module, name) in PRIVATE_ALLOWED:
                allowed_seen.add((module, name))
            else:
                unexpected.append(f"{module}:{line}: {what}")
    assert not unexpected, "private names of redis/arq/argparse:\n" + "\n".join(unexpected)
    stale = set(PRIVATE_ALLOWED) - allowed_seen
    assert not stale, f"allowed but no longer used (take them off PRIVATE_ALLOWED): {stale}"


def test_the_private_name_guard_finds_each_kind_of_use() -> None:
    source = """
import argparse
from arq.worker import Worker
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection

def stream(conn: AbstractConnection) -> object:
    return conn._reader

def walk(parser, command) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            getattr(command, "_option_string_actions")

class Own(Worker):
    def release(self) -> None:
        self._release_sem_dec_counter_on_complete()

class Secret:
    def __init__(self, value: str, server: Server) -> None:
        self._value = value
        self._srv = server
    def __eq__(self, other: object) -> bool:
        return self._value == other._value and self._srv._connections == {}
"""
    found = {(line, name) for line, name, _ in _private_uses(source)}
    assert found == {
        (4, "_parsers"),
        (8, "_reader"),
        (11, "_actions"),
        (12, "_SubParsersAction"),
        (13, "_option_string_actions"),
        (17, "_release_sem_dec_counter_on_complete"),
    }


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
    "(http_types.refusal: the reason label), and tests/edge/test_http_server.py pins "
    "each to a request that raises it"
)

# Names relay/ takes from aiohttp outside the rule above, each with its reason.
AIOHTTP_ALLOWED: dict[str, str] = {
    "aiohttp.http_exceptions.BadStatusLine": _PARSER_ERRORS,
    "aiohttp.http_exceptions.InvalidHeader": _PARSER_ERRORS,
    "aiohttp.http_exceptions.InvalidURLError": _PARSER_ERRORS,
    "aiohttp.http_exceptions.LineTooLong": _PARSER_ERRORS,
    "aiohttp.abc.AbstractResolver": (
        "the documented base of a custom resolver (TCPConnector(resolver=...)): an ABC of "
        "two abstract methods and no state; relay/delivery/targets.py wraps aiohttp's "
        "DefaultResolver in it to keep sinks to public addresses"
    ),
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
