"""Hostile inputs drawn by hypothesis: signature headers, JSON bodies (and raw bytes)
signed correctly, and paths under the admin API."""

from __future__ import annotations

import json
from typing import Any, TypeVar
from urllib.parse import quote

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st

from bench.hostile.cases import READ_KEYS

T = TypeVar("T")


def draw(strategy: st.SearchStrategy[T], n: int, at: int) -> list[T]:
    """Up to ``n`` examples of ``strategy`` (hypothesis' own generation, seeded)."""
    out: list[T] = []
    if n <= 0:
        return out

    @seed(at)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(strategy)
    def collect(value: T) -> None:
        out.append(value)

    collect()
    return out


_header_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n", exclude_categories=["Cs"]),
    max_size=120,
)
_hexish = st.text("0123456789abcdefABCDEFxg ", min_size=0, max_size=80)


def signature_headers() -> st.SearchStrategy[str]:
    """Free text, and texts shaped like the two formats with odd parts."""
    part = st.one_of(
        st.builds(lambda v: f"t={v}", st.one_of(st.integers(), _header_text)),
        st.builds(lambda v: f"v1={v}", _hexish),
        st.builds(lambda k, v: f"{k}={v}", _header_text, _header_text),
        _header_text,
    )
    shaped = st.lists(part, min_size=1, max_size=10).map(",".join)
    legacy = st.builds(lambda ts, h: f"v1,{ts},{h}", st.integers(), _hexish)
    return st.one_of(_header_text, shaped, legacy)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _with_fields(fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, **fields}


def json_bodies(tenant: str) -> st.SearchStrategy[bytes]:
    """Objects with the fields the relay reads set to anything (often to something
    right), serialized several ways; raw bytes; and JSON texts with a constant or a
    repeated key spliced in."""
    field_values = {
        "event_id": st.one_of(st.text(min_size=1, max_size=30), _json),
        "partner_id": st.one_of(st.just(tenant), _json),
        "event": st.one_of(st.just("message.received"), _json),
        "event_type": _json,
        "timestamp": st.one_of(st.just("2026-05-24T01:35:34Z"), _json),
        "payload": _json,
    }
    fields = st.fixed_dictionaries({}, optional=field_values)
    objects = st.builds(
        _with_fields, fields, st.dictionaries(st.text(max_size=10), _json, max_size=4)
    )
    encoded = st.builds(
        lambda obj, ascii_only, indent: json.dumps(
            obj, ensure_ascii=ascii_only, indent=indent
        ).encode("utf-8", "surrogatepass"),
        objects,
        st.booleans(),
        st.sampled_from([None, 0, 2]),
    )
    spliced = st.builds(
        lambda text, key, value: (
            ("{" + f'"{key}": {value}, ' + text[1:]).encode("utf-8", "surrogatepass")
            if text.startswith("{") and text != "{}"
            else text.encode("utf-8", "surrogatepass")
        ),
        objects.map(json.dumps),
        st.sampled_from([*READ_KEYS, "data"]),
        st.sampled_from(["NaN", "Infinity", "-Infinity", '"x"', "1", "[]", "null", '"\\ud800"']),
    )
    return st.one_of(encoded, spliced, st.binary(max_size=300))


def admin_paths() -> st.SearchStrategy[str]:
    raw = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)
    return st.one_of(
        raw.map(lambda p: quote(p, safe="/%?=&.")), raw.map(lambda p: quote(p, safe=""))
    )
