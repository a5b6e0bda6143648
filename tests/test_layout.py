"""The package's shape: stages as sub-packages, no import cycles, Lua only in files."""

from __future__ import annotations

import ast
import functools
import importlib.util
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


# -- No private name of redis, arq or argparse -------------------------------------------

# The libraries whose private names (a leading underscore: ``redis._parsers``,
# ``conn._reader``, ``argparse._SubParsersAction``) relay/ must not touch: they can change
# in any release. The private names are read from the installed libraries' own source, so
# the check follows an upgrade. (``_private_uses(source, libraries)`` serves any library.)
GUARDED_LIBRARIES = ("redis", "arq", "argparse")

# Each exception, by (module, name), with why it stands and what removes it.
PRIVATE_ALLOWED = {
    ("relay/delivery/arq_adapter.py", "_release_sem_dec_counter_on_complete"): (
        "BatchStartWorker starts arq's jobs itself and gives back arq's job slot the way "
        "arq's own start_jobs does; a delivery loop of the project's own on arq's public "
        "surface (own the loop, keep arq's queue) replaces arq's Worker loop and removes it"
    ),
}

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
