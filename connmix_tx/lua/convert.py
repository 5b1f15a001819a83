"""Lua values <-> Python values <-> JSON, by the rules of docs/lua-api.md, "JSON".

Lua strings are bytes (the runtime uses ``encoding=None``); Python strings are text.  Going to
Python, bytes are decoded as UTF-8 with each invalid byte replaced by U+FFFD (as Go does); going to
Lua, text is encoded as UTF-8.  A Lua table is a JSON array when it is empty or its keys are exactly
``1..n``; otherwise it is an object whose keys become strings.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any, Iterable, Protocol, TypeGuard

from lupa import luajit21 as lupa

from connmix_tx.lua.runtime import has_room

MAX_DEPTH = 128
#: Tables one conversion may visit: a value built from shared subtables (``x = {x, x}``
#: repeated) is a small graph but an exponential tree.
MAX_NODES = 100_000
MAX_EXACT_INTEGER = 2**53

JsonValue = Any


class ConvertError(ValueError):
    """A Lua value cannot be represented as JSON (function, cycle, NaN, too deep...)."""


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    """Replace every invalid byte by U+FFFD, as Go does (Python's "replace" merges some)."""
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("connmix.go_replace", _replace_each_byte)


def text_of(value: bytes) -> str:
    """Lua bytes as text: UTF-8 with each invalid byte replaced by U+FFFD."""
    return value.decode("utf-8", "connmix.go_replace")


_text = text_of


def utf8_of(value: str) -> bytes:
    """Text as UTF-8 bytes; lone surrogates (legal in JSON escapes) become U+FFFD."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _number(value: float | int) -> int | float:
    if isinstance(value, int):
        return value
    if math.isnan(value) or math.isinf(value):
        raise ConvertError("cannot encode NaN or infinity")
    if value.is_integer() and abs(value) < 1e21:
        return int(value)  # integral numbers without a fraction, as Go writes them below 1e21
    return value


def _key(key: object) -> str:
    if isinstance(key, bytes):
        return _text(key)
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, (int, float)):
        return str(_number(key))
    raise ConvertError(f"cannot use a {lupa.lua_type(key) or type(key).__name__} as an object key")


class LuaTable(Protocol):
    """A Lua table handed to Python (lupa's ``_LuaTable``: lupa ships no types)."""

    def items(self) -> Iterable[tuple[Any, Any]]:
        """Its key / value pairs, in traversal order."""

    def __getitem__(self, key: Any) -> Any:
        """The value at ``key`` (None when absent)."""


def is_table(value: object) -> TypeGuard[LuaTable]:
    """True for a Lua table."""
    return bool(lupa.lua_type(value) == "table")


def lua_type_name(value: object) -> str:
    """The Lua type name of a value handed to Python (for Lua-style argument errors)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, bytes):
        return "string"
    return lupa.lua_type(value) or "userdata"


class MemoryShortage(MemoryError):
    """A result would not fit in the script's memory budget (Lua sees ``not enough memory``)."""

    def __init__(self) -> None:
        super().__init__("not enough memory")


def lua_to_py(value: object) -> JsonValue:
    """Convert a Lua value to plain JSON-able Python (dict / list / str / int / float / bool / None).

    Raises ConvertError for what JSON cannot hold, and ``value too large`` past MAX_NODES tables.
    """
    return _lua_to_py(value, 0, frozenset(), [MAX_NODES])


def _lua_to_py(value: object, _depth: int, _seen: frozenset[str], _left: list[int]) -> JsonValue:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, (int, float)):
        return _number(value)
    if not is_table(value):
        kind = lupa.lua_type(value)
        raise ConvertError(f"cannot encode a {kind or type(value).__name__}")
    if _depth >= MAX_DEPTH:
        raise ConvertError(f"nesting deeper than {MAX_DEPTH}")
    identity = _identity(value)
    if identity in _seen:
        raise ConvertError("cyclic table")
    _left[0] -= 1
    if _left[0] < 0:
        raise ConvertError(f"value too large (more than {MAX_NODES} tables)")
    seen = _seen | {identity}
    items = list(value.items())
    if not items:
        return []
    n = len(items)
    if all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n for k, _ in items):
        result: list[Any] = [None] * n
        for k, v in items:
            result[k - 1] = _lua_to_py(v, _depth + 1, seen, _left)
        return result
    mapping: dict[str, Any] = {}
    for k, v in items:
        name = _key(k)
        if name not in mapping:  # {[1]=..., ["1"]=...}: the first in traversal order wins
            mapping[name] = _lua_to_py(v, _depth + 1, seen, _left)
    return mapping


def _identity(table: object) -> str:
    # lupa wraps one Lua table in a new Python object on every access, so Python identity says
    # nothing; the repr carries the Lua address ("<Lua table at 0x...>").
    return repr(table)


def lua_size(value: JsonValue) -> int:
    """A generous estimate of the Lua memory ``py_to_lua`` will allocate for ``value``."""
    if isinstance(value, (str, bytes)):
        return 32 + len(value) * (3 if isinstance(value, str) else 1)
    if isinstance(value, dict):
        return 96 + sum(64 + lua_size(k) + lua_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 96 + sum(24 + lua_size(v) for v in value)
    return 16


def py_to_lua(runtime: Any, value: JsonValue) -> object:
    """Convert plain Python (as produced by ``json.loads`` or ``lua_to_py``) to a Lua value.

    ``None`` inside an object drops the key; ``None`` inside an array leaves a hole (nil).
    Tables are built by unprotected Lua API calls, so a value that does not fit in the script's
    budget raises MemoryShortage before anything is built.
    """
    if isinstance(value, (dict, list, tuple)) or (isinstance(value, (str, bytes)) and len(value) > 65536):
        if not has_room(runtime, lua_size(value)):
            raise MemoryShortage()
    return _py_to_lua(runtime, value)


def _py_to_lua(runtime: Any, value: JsonValue) -> object:
    if isinstance(value, str):
        return utf8_of(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > MAX_EXACT_INTEGER:
        return float(value)  # Lua numbers are doubles: precision is lost, as docs/lua-api.md says
    if isinstance(value, dict):
        return runtime.table_from(
            {_to_lua_key(k): _py_to_lua(runtime, v) for k, v in value.items() if v is not None}
        )
    if isinstance(value, (list, tuple)):
        return runtime.table_from([_py_to_lua(runtime, v) for v in value])
    return value


def _to_lua_key(key: object) -> object:
    return utf8_of(key) if isinstance(key, str) else key


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dumps(value: JsonValue) -> bytes:
    """Compact JSON with sorted object keys, UTF-8 (not ``\\u`` escapes), no NaN."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ConvertError(str(e)) from None


def lua_to_json(value: object) -> bytes:
    """Encode a Lua value as JSON text (``mix.json_encode``, queue data)."""
    return dumps(lua_to_py(value))


def json_to_lua(runtime: Any, text: bytes | str) -> object:
    """Decode JSON text to a Lua value (``mix.json_decode``); raise ConvertError when invalid.

    Raises MemoryShortage before parsing when the containers the text may hold would not fit
    in the script's budget (parsing first would cost Python memory in proportion too).
    """
    if len(text) > 65536:
        raw = text.encode() if isinstance(text, str) else text
        containers = raw.count(b"[") + raw.count(b"{")
        if not has_room(runtime, containers * 128 + len(raw) * 2):
            raise MemoryShortage()
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise ConvertError(f"invalid json: {e}") from None
    return py_to_lua(runtime, value)
