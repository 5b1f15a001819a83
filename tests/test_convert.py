"""Tests for connmix_tx.lua.convert: the JSON rules of docs/lua-api.md on real LuaJIT values."""

from __future__ import annotations

from typing import Any

import pytest
from lupa import luajit21 as lupa

from connmix_tx.lua.convert import ConvertError, json_to_lua, lua_to_json, lua_to_py


@pytest.fixture(scope="module")
def runtime() -> Any:
    """A bare runtime configured like the engine's (bytes strings, tuples unpacked)."""
    return lupa.LuaRuntime(encoding=None, unpack_returned_tuples=True)


def encode(runtime: Any, expression: str) -> bytes:
    """JSON of the value of a Lua expression."""
    return lua_to_json(runtime.eval(expression))


def nested(runtime: Any, levels: int) -> Any:
    """``levels`` tables, each the only element of the one outside it."""
    build = runtime.eval(
        "function(n) local top = {} local t = top for i = 2, n do t[1] = {} t = t[1] end return top end"
    )
    return build(levels)


def describe(runtime: Any, value: Any) -> bytes:
    """A Lua-side, order-independent rendering of a decoded value (keys with their Lua types)."""
    render = runtime.eval("""
        function(v)
          if type(v) ~= 'table' then return type(v) .. ':' .. tostring(v) end
          local out = {}
          for k, x in pairs(v) do out[#out + 1] = type(k) .. ':' .. tostring(k) .. '=' .. tostring(x) end
          table.sort(out)
          return table.concat(out, ' ')
        end
    """)
    return render(value)


# --- arrays and objects -----------------------------------------------------------------------


@pytest.mark.parametrize("expression, expected", [
    ("{}", b"[]"),
    ("{1, 2, 3}", b"[1,2,3]"),
    ("{'a', {}, {x = {}}}", b'["a",[],{"x":[]}]'),
    ("{[1] = 'a', [3] = 'c'}", b'{"1":"a","3":"c"}'),  # not exactly 1..n
    ("{[2] = 'b'}", b'{"2":"b"}'),
    ("{1, 2, x = 1}", b'{"1":1,"2":2,"x":1}'),  # mixed tables are objects
    ("{[1.5] = 'x', [true] = 1, [10] = 2}", b'{"1.5":"x","10":2,"true":1}'),
    ("{[0] = 'zero'}", b'{"0":"zero"}'),
])
def test_array_or_object(runtime: Any, expression: str, expected: bytes) -> None:
    assert encode(runtime, expression) == expected


def test_object_keys_are_sorted(runtime: Any) -> None:
    expression = "{zeta = 1, alpha = {y = 1, b = 2, a = 3}, mid = true, Alpha = 0}"
    assert encode(runtime, expression) == b'{"Alpha":0,"alpha":{"a":3,"b":2,"y":1},"mid":true,"zeta":1}'


def test_table_key_is_an_error(runtime: Any) -> None:
    with pytest.raises(ConvertError, match="object key"):
        encode(runtime, "{[{}] = 1}")


# --- scalars ----------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, expected", [
    ("3.0", b"3"),
    ("-7", b"-7"),
    ("2^53", b"9007199254740992"),
    ("-(2^53)", b"-9007199254740992"),
    ("0.5", b"0.5"),
    ("-0.0", b"0"),
    ("1e300", b"1e+300"),
    ("true", b"true"),
    ("false", b"false"),
    ("nil", b"null"),
])
def test_numbers_and_literals(runtime: Any, expression: str, expected: bytes) -> None:
    assert encode(runtime, expression) == expected


@pytest.mark.parametrize("expression", ["0/0", "1/0", "-1/0", "{1, 0/0}", "{x = 1/0}"])
def test_nan_and_infinity_are_errors(runtime: Any, expression: str) -> None:
    with pytest.raises(ConvertError):
        encode(runtime, expression)


def test_strings(runtime: Any) -> None:
    assert encode(runtime, "'caf\\195\\169 <b>&amp;</b>'") == '"café <b>&amp;</b>"'.encode()
    assert encode(runtime, "'tab\\tquote\"back\\\\'") == b'"tab\\tquote\\"back\\\\"'
    assert encode(runtime, "'\\0'") == b'"\\u0000"'


@pytest.mark.parametrize("expression, expected", [
    ("'a\\255b'", "a\ufffdb"),
    ("'\\192\\128'", "\ufffd\ufffd"),  # overlong encoding: two invalid bytes
    ("'\\237\\160\\128'", "\ufffd\ufffd\ufffd"),  # encoded surrogate
    ("{['k\\255'] = 'v'}", {"k\ufffd": "v"}),
])
def test_invalid_utf8_becomes_replacement_characters(runtime: Any, expression: str, expected: Any) -> None:
    assert lua_to_py(runtime.eval(expression)) == expected


def test_truncated_sequence_is_replaced_byte_by_byte(runtime: Any) -> None:
    assert lua_to_json(runtime.eval("'a\\226\\130b'")) == '"a\ufffd\ufffdb"'.encode()


# --- what cannot be encoded -------------------------------------------------------------------


@pytest.mark.parametrize("expression", [
    "print",
    "function() end",
    "{f = function() end}",
    "coroutine.create(function() end)",
    "{co = coroutine.create(function() end)}",
])
def test_functions_and_threads_are_errors(runtime: Any, expression: str) -> None:
    with pytest.raises(ConvertError, match="cannot encode"):
        encode(runtime, expression)


def test_cycles_are_errors_shared_tables_are_not(runtime: Any) -> None:
    with pytest.raises(ConvertError, match="cyclic"):
        encode(runtime, "(function() local t = {} t.self = t return t end)()")
    with pytest.raises(ConvertError, match="cyclic"):
        encode(runtime, "(function() local a, b = {}, {} a[1] = b b[1] = a return a end)()")
    shared = "(function() local s = {1} return {a = s, b = {s}} end)()"
    assert encode(runtime, shared) == b'{"a":[1],"b":[[1]]}'


def test_depth_limit(runtime: Any) -> None:
    assert lua_to_json(nested(runtime, 128)) == b"[" * 127 + b"[]" + b"]" * 127
    with pytest.raises(ConvertError, match="deeper than 128"):
        lua_to_json(nested(runtime, 129))


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"a": null, "b": 1}', b"string:b=1"),  # a null member is absent
    ("[1, null, 3]", b"number:1=1 number:3=3"),  # a hole, the array stays 1-based
    ('{"1": "x"}', b"string:1=x"),  # object keys stay strings
    ("{}", b""),
    ("null", b"nil:nil"),
    ('"caf\\u00e9"', "string:café".encode()),
    ("1.5", b"number:1.5"),
    ("true", b"boolean:true"),
])
def test_decode(runtime: Any, text: str, expected: bytes) -> None:
    assert describe(runtime, json_to_lua(runtime, text)) == expected


def test_decode_nested(runtime: Any) -> None:
    value = json_to_lua(runtime, '{"a": [{"b": [true, false]}], "n": -2}')
    assert value[b"a"][1][b"b"][2] is False and value[b"n"] == -2


@pytest.mark.parametrize("text", ["", "{", "[1,]", "{'a': 1}", "[" * 100_000])
def test_decode_invalid(runtime: Any, text: str) -> None:
    with pytest.raises(ConvertError, match="^invalid json: "):
        json_to_lua(runtime, text)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"x": -Infinity}'])
def test_decode_refuses_non_json_constants(runtime: Any, text: str) -> None:
    with pytest.raises(ConvertError, match="^invalid json: "):
        json_to_lua(runtime, text)


def test_round_trip_keeps_values(runtime: Any) -> None:
    text = b'{"ctx":{"headers":{"host":"x"}},"msg":{"data":"test","finish":true,"type":"text"}}'
    assert lua_to_json(json_to_lua(runtime, text)) == text
