"""Argument checks of the Python-side ``mix`` functions, made the way Lua's own library makes them.

A wrong argument type raises ``TypeError`` with Lua's wording (``bad argument #2 to 'md5'
(string expected, got table)``), which lupa turns into a Lua error.  Where a string is expected a
number is accepted and converted as Lua's ``tostring`` does (``"%.14g"``); where a number is
expected a numeric string is accepted as Lua's ``tonumber`` reads it.
"""

from __future__ import annotations

import re

from connmix_tx.lua.convert import lua_type_name

__all__ = ["bad_argument", "number_arg", "string_arg"]


def bad_argument(index: int, function: str, expected: str, value: object) -> TypeError:
    """The error Lua's own library raises for a wrong argument."""
    return TypeError(f"bad argument #{index} to '{function}' ({expected} expected, got {lua_type_name(value)})")


def string_arg(value: object, index: int, function: str) -> bytes:
    """A string argument; numbers are converted as Lua converts them."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return b"%.14g" % value
    raise bad_argument(index, function, "string", value)


_NUMERIC = re.compile(rb"\s*[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")


def number_arg(value: object, index: int, function: str) -> int | float:
    """A number argument; numeric strings are converted as Lua's ``tonumber`` does."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes) and _NUMERIC.fullmatch(value):
        text = value.strip().decode("ascii")
        return int(text, 16) if "x" in text.lower() else float(text)
    raise bad_argument(index, function, "number", value)
