"""A sink's body filter: which events, by their fields, a sink takes (beside its
``events`` type globs).

A filter is a table shaped like the event (the envelope a sink receives), with
operators as keys::

    filter = { data = { chat = { is_group = true } } }
    filter = { "$or" = [{ data.direction = "inbound" }, { data.priority = { "$gte" = 5 } }] }

- A field's name descends into the event's object of that name (TOML's dotted keys,
  ``data.chat.is_group = true``, are the same nested tables); a scalar value means
  equality, a table holds the conditions on that field.
- Comparisons: ``$eq``, ``$neq``, ``$gt``, ``$gte``, ``$lt``, ``$lte`` (numbers only: a
  boolean is not a number), ``$in``, ``$nin`` (a list of strings, numbers or booleans),
  ``$startsWith``, ``$endsWith`` (strings), ``$exist`` (alias ``$exists``: true or false).
- Logic, at any level: ``$and`` and ``$or`` (a list of tables), ``$not`` (a table).
  The keys of one table must all hold.
- A field the event lacks (or cannot hold: the field of a string) matches no
  comparison — ``$neq`` and ``$nin`` included — only ``$exist = false``; ``$not``
  negates what it holds, so ``$not = { "$eq" = 1 }`` matches an event without the field.
- An array in the event: a comparison matches if any element does; ``$neq`` and
  ``$nin`` match if no element is equal (or in the list). Field names do not reach
  into arrays.
- Types are strict: ``"1"`` is not ``1``, ``true`` is not ``1``; ``1`` is ``1.0``.

:func:`compile_filter` validates a filter and builds its matcher once (closures: no
per-event reading of the filter). A problem raises :class:`FilterError`, which names
the key path inside the filter (``data.chat.$in``) for the configuration's error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]

MAX_DEPTH = 16  # tables and lists nested in a filter
MAX_CONDITIONS = 256  # fields and operators in one filter
MAX_LIST = 1024  # values of one $in / $nin
MAX_TEXT = 4096  # characters of one string
_MISSING = object()  # the value of a field the event lacks

COMPARISONS = (
    "$eq",
    "$neq",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$startsWith",
    "$endsWith",
    "$exist",
)
LOGICAL = ("$and", "$or", "$not")
_ALIASES = {"$exists": "$exist"}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]+")


class FilterError(ValueError):
    """A filter that cannot be used: ``where`` is the key path inside the filter
    (``.data.chat.$in``, ``.$or[1]``; ``""`` for the filter itself)."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(message)


def _key(name: str) -> str:
    return f".{name}" if _PLAIN_KEY.fullmatch(name) else '."' + name.replace('"', '\\"') + '"'


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _scalar_key(v: object) -> tuple[int, Any] | None:
    """A value as a set member that keeps types apart (``True`` is not ``1``); None for
    what no filter value equals (objects, arrays, null)."""
    if isinstance(v, bool):
        return (0, v)
    if isinstance(v, int | float):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    return None


def _any_element(pred: Check) -> Check:
    """``pred``, or for an array: whether any element satisfies it."""

    def check(v: Any) -> bool:
        if isinstance(v, list):
            return any(pred(x) for x in v)
        return pred(v)

    return check


def _none_present(pred: Check) -> Check:
    """A negative comparison: the field is there and neither it nor, for an array, any
    element satisfies ``pred``."""

    def check(v: Any) -> bool:
        if v is _MISSING:
            return False
        if isinstance(v, list):
            return not any(pred(x) for x in v)
        return not pred(v)

    return check


def _all(checks: list[Check]) -> Check:
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)

    def check(v: Any) -> bool:
        return all(c(v) for c in checks)

    return check


def _equals(x: str | int | float | bool) -> Check:
    if isinstance(x, bool):
        return lambda v: v is x
    if isinstance(x, str):
        return lambda v: isinstance(v, str) and v == x
    return lambda v: _is_number(v) and v == x


Path = tuple[str, ...]


class _Compiler:
    def __init__(self) -> None:
        self.conditions = 0
        self.paths: set[Path] = set()  # the fields whose values the filter compares

    def count(self, where: str) -> None:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise FilterError(where, f"a filter holds at most {MAX_CONDITIONS} conditions")

    def scalar(self, value: object, where: str, what: str = "a value") -> str | int | float | bool:
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise FilterError(where, f"a string of at most {MAX_TEXT} characters")
            return value
        if isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            if math.isnan(value):
                raise FilterError(where, "nan equals nothing: use a number")
            return value
        if isinstance(value, list):
            raise FilterError(
                where, f"expected {what}, got a list (for one of several values: $in)"
            )
        raise FilterError(where, f"expected {what} (a string, number or boolean)")

    def table(self, spec: object, where: str, depth: int, root: bool, at: Path = ()) -> Check:
        """The conditions of a table, on the value at its place (the event at the root)."""
        if not isinstance(spec, Mapping):
            raise FilterError(where, "expected a table (a filter)")
        if depth > MAX_DEPTH:
            raise FilterError(where, f"a filter nests at most {MAX_DEPTH} levels")
        if not spec:
            raise FilterError(where, "an empty table: name a field or an operator")
        checks: list[Check] = []
        for name, sub in spec.items():
            if not isinstance(name, str) or not name:
                raise FilterError(where, "a field's name is a non-empty string")
            here = where + _key(name)
            self.count(here)
            if name.startswith("$"):
                op = _ALIASES.get(name, name)
                checks.append(self.operator(op, sub, here, depth, root, at))
            else:
                checks.append(self.field(name, sub, here, depth, (*at, name)))
        return _all(checks)

    def field(self, name: str, sub: object, where: str, depth: int, at: Path) -> Check:
        if isinstance(sub, Mapping):
            child = self.table(sub, where, depth + 1, False, at)
        else:
            child = _any_element(_equals(self.scalar(sub, where)))
            self.paths.add(at)

        def check(v: Any) -> bool:
            return child(v.get(name, _MISSING) if isinstance(v, dict) else _MISSING)

        return check

    def operator(self, op: str, arg: object, where: str, depth: int, root: bool, at: Path) -> Check:
        if op in LOGICAL:
            return self.logical(op, arg, where, depth, root, at)
        if op not in COMPARISONS:
            raise FilterError(
                where,
                f"unknown operator {op!r} (one of {', '.join(COMPARISONS + LOGICAL)}, "
                "or a field's name without $)",
            )
        if root:
            raise FilterError(where, f"{op} compares a field: put it under the field's name")
        self.paths.add(at)
        return self.comparison(op, arg, where)

    def logical(self, op: str, arg: object, where: str, depth: int, root: bool, at: Path) -> Check:
        if op == "$not":
            inner = self.table(arg, where, depth + 1, root, at)
            return lambda v: not inner(v)
        if not isinstance(arg, list) or not arg:
            raise FilterError(where, "expected a non-empty list of tables")
        if depth + 1 > MAX_DEPTH:
            raise FilterError(where, f"a filter nests at most {MAX_DEPTH} levels")
        parts = [self.table(t, f"{where}[{i}]", depth + 2, root, at) for i, t in enumerate(arg)]
        if op == "$and":
            return _all(parts)
        return lambda v: any(p(v) for p in parts)

    def comparison(self, op: str, arg: object, where: str) -> Check:
        if op == "$exist":
            if not isinstance(arg, bool):
                raise FilterError(where, "expected true or false")
            return lambda v: (v is not _MISSING) is arg
        if op in ("$in", "$nin"):
            if not isinstance(arg, list) or not arg:
                raise FilterError(where, "expected a non-empty list of values")
            if len(arg) > MAX_LIST:
                raise FilterError(where, f"a list of at most {MAX_LIST} values")
            members = frozenset(
                _scalar_key(self.scalar(x, f"{where}[{i}]")) for i, x in enumerate(arg)
            )
            within: Check = lambda v: _scalar_key(v) in members  # noqa: E731
            return _any_element(within) if op == "$in" else _none_present(within)
        if op in ("$startsWith", "$endsWith"):
            text = self.scalar(arg, where, "a string")
            if not isinstance(text, str):
                raise FilterError(where, "expected a string")
            if op == "$startsWith":
                return _any_element(lambda v: isinstance(v, str) and v.startswith(text))
            return _any_element(lambda v: isinstance(v, str) and v.endswith(text))
        x = self.scalar(arg, where)
        if op == "$eq":
            return _any_element(_equals(x))
        if op == "$neq":
            return _none_present(_equals(x))
        if not _is_number(x):
            raise FilterError(where, f"{op} compares numbers: expected a number")
        return _any_element(_ORDER[op](x))


def _gt(x: Any) -> Check:
    return lambda v: _is_number(v) and v > x


def _gte(x: Any) -> Check:
    return lambda v: _is_number(v) and v >= x


def _lt(x: Any) -> Check:
    return lambda v: _is_number(v) and v < x


def _lte(x: Any) -> Check:
    return lambda v: _is_number(v) and v <= x


_ORDER: dict[str, Callable[[Any], Check]] = {"$gt": _gt, "$gte": _gte, "$lt": _lt, "$lte": _lte}


class EventFilter:
    """A validated filter: ``f(envelope)`` says whether the sink takes the event.

    ``spec`` is the filter as written; two filters are equal when their specs are."""

    __slots__ = ("_check", "paths", "spec")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        compiler = _Compiler()
        self._check = compiler.table(spec, "", 1, root=True)
        # The fields whose values it reads, as paths from the event's top: a parse that
        # builds these (and what holds them) is all the filter needs of the body.
        self.paths: frozenset[Path] = frozenset(compiler.paths)

    def __call__(self, envelope: Any) -> bool:
        return self._check(envelope)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventFilter) and other.spec == self.spec

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EventFilter({self.spec!r})"


def compile_filter(spec: object) -> EventFilter:
    """A filter from its configuration (a TOML table); :class:`FilterError` if unusable."""
    if isinstance(spec, EventFilter):
        return spec
    if not isinstance(spec, Mapping):
        raise FilterError("", "expected a table shaped like the event")
    return EventFilter(spec)
