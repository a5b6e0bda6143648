"""Sink filters (:mod:`relay.config.filters`): every operator on the event's fields, the
rules for missing fields, arrays and types, and the configuration's errors with the key
path inside the filter — ``check-config`` included."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.config import parse_config
from relay.config.filters import MAX_CONDITIONS, MAX_DEPTH, FilterError, compile_filter
from relay.errors import EXIT_CONFIG, ConfigError
from relay.ingest import envelope as envelopes
from tests.support.common import config_dict, envelope
from tests.support.process import write_toml

GROUP = envelope("e1", data={"chat": {"id": "c1", "is_group": True}, "n": 7, "tags": ["a", "b"]})
EVENT: dict[str, Any] = {
    "event": "message.received",
    "partner_id": "acme",
    "data": {
        "chat": {"id": "17f6e9ed", "is_group": False, "members": 3},
        "message": {"direction": "inbound", "sender": "+15550001", "score": 2.5},
        "tags": ["vip", "new"],
        "counts": [1, 5, 9],
        "nothing": None,
        "flag": True,
        "text": "1",
    },
}


def takes(spec: dict[str, Any], event: Any = EVENT) -> bool:
    return compile_filter(spec)(event)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # a scalar is equality; tables descend (TOML's dotted keys are these tables)
        ({"data": {"chat": {"is_group": False}}}, True),
        ({"data": {"chat": {"is_group": True}}}, False),
        ({"event": "message.received"}, True),
        ({"data": {"message": {"direction": "outbound"}}}, False),
        ({"data": {"chat": {"members": 3.0}}}, True),  # 3 is 3.0
        # $eq / $neq
        ({"data": {"message": {"direction": {"$eq": "inbound"}}}}, True),
        ({"data": {"message": {"direction": {"$neq": "inbound"}}}}, False),
        ({"data": {"message": {"direction": {"$neq": "outbound"}}}}, True),
        ({"data": {"nothing": {"$neq": "x"}}}, True),  # null is there, and not "x"
        # numbers
        ({"data": {"chat": {"members": {"$gt": 2}}}}, True),
        ({"data": {"chat": {"members": {"$gt": 3}}}}, False),
        ({"data": {"chat": {"members": {"$gte": 3}}}}, True),
        ({"data": {"chat": {"members": {"$lt": 3}}}}, False),
        ({"data": {"chat": {"members": {"$lte": 3}}}}, True),
        ({"data": {"message": {"score": {"$gt": 2, "$lt": 3}}}}, True),
        ({"data": {"text": {"$gte": 0}}}, False),  # "1" is not a number
        ({"data": {"flag": {"$gte": 0}}}, False),  # nor is true
        # $in / $nin
        ({"data": {"message": {"direction": {"$in": ["inbound", "x"]}}}}, True),
        ({"data": {"message": {"direction": {"$in": ["x", "y"]}}}}, False),
        ({"data": {"message": {"direction": {"$nin": ["x", "y"]}}}}, True),
        ({"data": {"message": {"direction": {"$nin": ["inbound"]}}}}, False),
        ({"data": {"chat": {"members": {"$in": [1, 3]}}}}, True),
        ({"data": {"flag": {"$in": [1]}}}, False),  # true is not 1
        ({"data": {"text": {"$in": [1]}}}, False),  # "1" is not 1
        ({"data": {"flag": {"$in": [True]}}}, True),
        # strings
        ({"data": {"message": {"sender": {"$startsWith": "+1555"}}}}, True),
        ({"data": {"message": {"sender": {"$startsWith": "+44"}}}}, False),
        ({"data": {"message": {"sender": {"$endsWith": "0001"}}}}, True),
        ({"data": {"chat": {"members": {"$startsWith": "3"}}}}, False),
        # $exist (and its alias $exists)
        ({"data": {"chat": {"$exist": True}}}, True),
        ({"data": {"nothing": {"$exist": True}}}, True),  # null is there
        ({"data": {"missing": {"$exist": False}}}, True),
        ({"data": {"missing": {"$exists": True}}}, False),
        ({"data": {"chat": {"$exists": False}}}, False),
        # logic
        ({"$or": [{"event": "x"}, {"data": {"flag": True}}]}, True),
        ({"$or": [{"event": "x"}, {"data": {"flag": False}}]}, False),
        ({"$and": [{"event": "message.received"}, {"data": {"flag": True}}]}, True),
        ({"$and": [{"event": "message.received"}, {"data": {"flag": False}}]}, False),
        ({"$not": {"data": {"chat": {"is_group": True}}}}, True),
        ({"data": {"chat": {"$not": {"members": {"$gt": 10}}}}}, True),
        ({"data": {"chat": {"id": {"$or": [{"$startsWith": "17"}, {"$eq": "x"}]}}}}, True),
        # several keys of one table must all hold
        ({"event": "message.received", "data": {"flag": False}}, False),
    ],
)
def test_each_operator_on_the_events_fields(spec: dict[str, Any], expected: bool) -> None:
    assert takes(spec) is expected


@pytest.mark.parametrize(
    "condition",
    [
        "inbound",
        {"$eq": "inbound"},
        {"$neq": "x"},
        {"$gt": 0},
        {"$gte": 0},
        {"$lt": 0},
        {"$lte": 0},
        {"$in": ["inbound"]},
        {"$nin": ["x"]},
        {"$startsWith": "in"},
        {"$endsWith": "bound"},
        {"$exist": True},
    ],
)
def test_a_missing_field_matches_no_comparison(condition: Any) -> None:
    assert not takes({"data": {"message": {"absent": condition}}})
    assert not takes({"data": {"absent": {"deeper": condition}}})
    assert not takes({"data": {"text": {"deeper": condition}}})  # a string has no fields
    assert takes({"data": {"message": {"absent": {"$not": {"$exist": True}}}}})


def test_not_negates_what_it_holds_so_it_matches_a_missing_field() -> None:
    assert takes({"data": {"absent": {"$not": {"$eq": 1}}}})
    assert not takes({"data": {"absent": {"$neq": 1}}})  # $neq needs the field


def test_an_array_matches_if_any_element_does_and_neq_nin_if_none_does() -> None:
    assert takes({"data": {"tags": "vip"}})
    assert takes({"data": {"tags": {"$in": ["new", "x"]}}})
    assert not takes({"data": {"tags": "old"}})
    assert takes({"data": {"counts": {"$gt": 8}}})
    assert not takes({"data": {"counts": {"$gt": 9}}})
    assert takes({"data": {"tags": {"$startsWith": "v"}}})
    assert not takes({"data": {"tags": {"$neq": "vip"}}})
    assert takes({"data": {"tags": {"$neq": "old"}}})
    assert not takes({"data": {"tags": {"$nin": ["new"]}}})
    assert takes({"data": {"tags": {"$nin": ["old"]}}})
    # field names do not reach into arrays
    assert not takes({"data": {"chat": {"id": "a"}}}, {"data": {"chat": [{"id": "a"}]}})


def test_an_event_that_is_not_an_object_matches_only_what_needs_no_field() -> None:
    assert not takes({"data": {"x": 1}}, None)
    assert takes({"data": {"$exist": False}}, [])


def test_equal_filters_compare_equal_and_a_compiled_one_passes_through() -> None:
    f = compile_filter({"a": 1})
    assert f == compile_filter({"a": 1})
    assert f != compile_filter({"a": 2})
    assert compile_filter(f) is f


def _problem(spec: Any) -> tuple[str, str]:
    with pytest.raises(FilterError) as e:
        compile_filter(spec)
    return e.value.where, str(e.value)


@pytest.mark.parametrize(
    ("spec", "where", "said"),
    [
        ([1], "", "expected a table"),
        ({}, "", "an empty table"),
        ({"data": {}}, ".data", "an empty table"),
        ({"data": {"chat": {"$in": 3}}}, ".data.chat.$in", "expected a non-empty list"),
        ({"data": {"chat": {"$in": []}}}, ".data.chat.$in", "expected a non-empty list"),
        ({"a": {"$in": [1, {"b": 1}]}}, ".a.$in[1]", "expected a value"),
        ({"a": {"$nin": [[1]]}}, ".a.$nin[0]", "got a list"),
        ({"a": [1, 2]}, ".a", "for one of several values: $in"),
        ({"a": {"$gt": "x"}}, ".a.$gt", "compares numbers"),
        ({"a": {"$lte": True}}, ".a.$lte", "compares numbers"),
        ({"a": {"$startsWith": 1}}, ".a.$startsWith", "expected a string"),
        ({"a": {"$endsWith": ["x"]}}, ".a.$endsWith", "got a list"),
        ({"a": {"$exist": "yes"}}, ".a.$exist", "expected true or false"),
        ({"a": {"$regex": "x"}}, ".a.$regex", "unknown operator '$regex'"),
        ({"$or": {"a": 1}}, ".$or", "expected a non-empty list of tables"),
        ({"$and": []}, ".$and", "expected a non-empty list of tables"),
        ({"$or": [{"a": 1}, 3]}, ".$or[1]", "expected a table"),
        ({"$or": [{"a": 1}, {"b": {"$foo": 1}}]}, ".$or[1].b.$foo", "unknown operator"),
        ({"$not": 1}, ".$not", "expected a table"),
        ({"$eq": 1}, ".$eq", "compares a field"),
        ({"$not": {"$exist": True}}, ".$not.$exist", "compares a field"),
        ({"a": {"$eq": float("nan")}}, ".a.$eq", "nan equals nothing"),
        ({"a": {"$eq": "x" * 5000}}, ".a.$eq", "at most 4096 characters"),
        ({"a.b c": {"$x": 1}}, '."a.b c".$x', "unknown operator"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_key_path(spec: Any, where: str, said: str) -> None:
    found_where, message = _problem(spec)
    assert found_where == where
    assert said in message


def test_depth_and_size_are_bounded() -> None:
    deep: dict[str, Any] = {"x": 1}
    for _ in range(MAX_DEPTH):
        deep = {"a": deep}
    assert "nests at most" in _problem(deep)[1]
    wide = {f"f{i}": i for i in range(MAX_CONDITIONS + 1)}
    assert "at most" in _problem(wide)[1]
    assert "at most 1024 values" in _problem({"a": {"$in": list(range(1025))}})[1]
    ok = {f"f{i}": i for i in range(MAX_CONDITIONS)}
    assert compile_filter(ok)({f"f{i}": i for i in range(MAX_CONDITIONS)})


def _sinks_config(filter_: Any) -> dict[str, Any]:
    data = config_dict()
    data["tenants"][0]["sinks"][1]["filter"] = filter_
    return data


def test_a_sink_takes_a_filter_from_its_configuration() -> None:
    config = parse_config(_sinks_config({"data": {"chat": {"is_group": True}}}), env={})
    sink = config.tenants[0].sinks[1]
    assert sink.filter is not None
    assert sink.filter(GROUP)
    assert not sink.filter(EVENT)
    assert config.tenants[0].sinks[0].filter is None
    again = parse_config(_sinks_config({"data": {"chat": {"is_group": True}}}), env={})
    assert again.tenants[0].sinks == config.tenants[0].sinks


def test_the_configurations_error_names_the_path_into_the_filter() -> None:
    data = _sinks_config({"data": {"chat": {"$in": 3}}})
    data["tenants"][0]["sinks"][0]["filter"] = {"$or": [{"a": {"$gte": "x"}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert ("tenants[0].sinks[1].filter.data.chat.$in", "expected a non-empty list of values") in (
        e.value.problems
    )
    problem = (
        "tenants[0].sinks[0].filter.$or[0].a.$gte",
        "$gte compares numbers: expected a number",
    )
    assert problem in e.value.problems
    with pytest.raises(ConfigError) as e:
        parse_config(_sinks_config("group chats"), env={})
    assert e.value.problems == [
        ("tenants[0].sinks[1].filter", "expected a table shaped like the event")
    ]


async def test_check_config_refuses_a_bad_filter_with_its_path_and_exit_code(
    tmp_path: Path,
) -> None:
    path = write_toml(tmp_path / "relay.toml", _sinks_config({"data": {"chat": {"$bogus": 1}}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--config", str(path), "check-config",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == EXIT_CONFIG == 78
    said = (out + err).decode()
    assert "tenants[0].sinks[1].filter.data.chat.$bogus: unknown operator '$bogus'" in said
    ok = write_toml(tmp_path / "ok.toml", _sinks_config({"data": {"chat": {"is_group": True}}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--config", str(ok), "check-config",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out + err).decode()


def test_a_filter_names_the_fields_it_reads_and_the_webhook_parse_builds_only_those() -> None:
    f = compile_filter(
        {
            "data": {"chat": {"is_group": True, "$not": {"id": {"$in": ["x"]}}}},
            "$or": [{"event": "message.received"}, {"data": {"tags": {"$exist": True}}}],
        }
    )
    assert f.paths == {
        ("data", "chat", "is_group"),
        ("data", "chat", "id"),
        ("event",),
        ("data", "tags"),
    }
    reader = envelopes.reader_for(f.paths)
    assert reader is envelopes.reader_for(set(f.paths))  # built once per set of paths
    assert envelopes.reader_for(()) is None
    raw = json.dumps(GROUP).encode()
    ev = envelopes.from_body(raw, reader=reader)
    assert ev.envelope is not None
    assert ev.envelope["data"] == {"chat": {"id": "c1", "is_group": True}, "tags": ["a", "b"]}
    assert "n" not in ev.envelope["data"]  # not read by any filter: never built
    assert f(ev.envelope)
    assert ev.body == raw  # the body as sent, whatever was built
    assert envelopes.from_body(raw).envelope is None  # no filter: only what the relay reads


@pytest.mark.parametrize(
    "data",
    [
        {"chat": "c1"},  # a string where the filter's path goes on
        {"chat": ["c1"]},
        [1, 2],
        "text",
    ],
)
def test_a_body_not_of_the_filters_shape_is_parsed_whole_and_decided_the_same(
    data: Any,
) -> None:
    f = compile_filter({"data": {"chat": {"is_group": True}}})
    g = compile_filter({"data": {"$not": {"chat": {"is_group": True}}}})
    reader = envelopes.reader_for(f.paths | g.paths)
    ev = envelopes.from_body(json.dumps(envelope("e1", data=data)).encode(), reader=reader)
    assert ev.envelope is not None
    assert ev.envelope["data"] == data
    assert not f(ev.envelope)
    assert g(ev.envelope)


def test_a_path_read_whole_covers_the_paths_below_it() -> None:
    reader = envelopes.reader_for({("data",), ("data", "chat", "x")})
    ev = envelopes.from_body(json.dumps(GROUP).encode(), reader=reader)
    assert ev.envelope is not None
    assert ev.envelope["data"] == GROUP["data"]
