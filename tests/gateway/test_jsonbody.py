"""Bounded JSON parsing (services/gateway/jsonbody.py)."""

from __future__ import annotations

import pytest

from services.gateway.errors import BadRequest, PayloadTooLarge
from services.gateway.jsonbody import depth, parse_json


def test_depth_counts_arrays_and_objects() -> None:
    assert [depth(1), depth([]), depth({"a": [1, {"b": []}]})] == [0, 1, 4]


def test_parse_json_bounds_depth_and_size() -> None:
    assert parse_json(b'{"a": [[1]]}', "body", 100, max_depth=3) == {"a": [[1]]}
    with pytest.raises(BadRequest) as deep:
        parse_json(b'{"a": [[[1]]]}', "body", 100, max_depth=3)
    assert deep.value.reason == "json_too_deep"
    with pytest.raises(BadRequest) as recursion:
        parse_json(b"[" * 100_000, "body", 10**6)
    assert recursion.value.reason == "json_too_deep"
    with pytest.raises(PayloadTooLarge) as large:
        parse_json(b"[1, 2, 3]", "body", 4)
    assert large.value.reason == "json_too_large"
    with pytest.raises(BadRequest) as bad:
        parse_json(b"{nope", "body", 100)
    assert bad.value.reason == "bad_json"
