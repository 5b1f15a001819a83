"""The Lua-side JSON encoder (used by mix.json_encode and mix.queue.push) writes exactly what the
Python rules of docs/lua-api.md, "JSON" (connmix_tx/lua/convert.py) write, for thousands of
generated values."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from connmix_tx.lua.convert import ConvertError, lua_to_json
from luahelpers import make_engine

STRINGS = ["", "a", "caf\u00e9", "\u4e2d\u6587", 'q"uote', "back\\slash", "\n\t\r\b\f", "\x00\x01\x1f\x7f",
           "<&>", "emoji \U0001F600", "1", "10", "-3"]


def value(rng: random.Random, depth: int = 0) -> Any:
    """A random Lua-representable value: scalars, arrays, objects with string/number keys."""
    kind = rng.choice(["int", "float", "str", "bool", "array", "object", "bigint"] if depth < 4
                      else ["int", "float", "str", "bool"])
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "bigint":
        return rng.choice([2**53, -(2**53), 2**53 + 2, 10**20, 123456789012345678])
    if kind == "float":
        return rng.choice([0.1, -2.5, 1e300, 1e-300, 3.141592653589793, 1 / 3, 2.0, 1e16, 123.456])
    if kind == "str":
        return rng.choice(STRINGS)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "array":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [rng.choice(STRINGS + [rng.randint(-3, 9)]) for _ in range(rng.randint(1, 5))]
    return {k: value(rng, depth + 1) for k in keys}


def to_lua_source(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v)) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        return '"' + "".join(f"\\{b}" for b in v.encode()) + '"'
    if isinstance(v, list):
        return "{" + ", ".join(to_lua_source(x) for x in v) + "}"
    return "{" + ", ".join(f"[{to_lua_source(k)}] = {to_lua_source(x)}" for k, x in v.items()) + "}"


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    return make_engine(tmp_path, "function on_message(msg) local v = assert(loadstring(msg.data))() "
                                 "return v, mix.json_encode(v) end\n")


def test_lua_encoder_matches_the_python_rules(engine: Any) -> None:
    rng = random.Random(20261125)
    checked = 0
    for _ in range(1500):
        source = "return " + to_lua_source(value(rng))
        table, encoded, *_ = engine.message(None, source.encode()).values
        try:
            expected = lua_to_json(table)
        except ConvertError:
            continue
        assert encoded == expected, source
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("source, error", [
    ("return {f = print}", b"cannot encode a function"),
    ("local t = {} t.self = t return t", b"cyclic table"),
    ("return {0/0}", b"cannot encode NaN or infinity"),
    ("local t = {} local c = t for i = 1, 200 do c[1] = {} c = c[1] end return t", b"nesting deeper than 128"),
])
def test_lua_encoder_errors(engine: Any, source: str, error: bytes) -> None:
    _, encoded, err = engine.message(None, source.encode()).values
    assert encoded is None and err == error


def test_invalid_utf8_is_replaced_byte_by_byte(engine: Any) -> None:
    _, encoded, *_ = engine.message(None, b'return "a\\226\\130b\\255"').values
    assert encoded == '"a\ufffd\ufffdb\ufffd"'.encode()
