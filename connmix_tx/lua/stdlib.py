"""The pure members of the ``mix`` library: encoding and hashing here, and their registration.

Nothing here touches the engine.  Each function takes Lua values as lupa hands them over
(``bytes`` for strings, ``int``/``float`` for numbers, a lupa table for tables) and returns plain
Python values; ``extensions(runtime)`` wraps them, with ``php_pack``/``php_unpack``
(``connmix_tx.lua.php_pack``) and ``parse_url`` (``connmix_tx.lua.go_url``), for
``Script(extensions=...)`` and turns the lists and dicts they return into tables of the script's
runtime.  docs/lua-api.md describes them for script authors.

Conventions, as Lua's own library: a runtime failure returns ``None, err`` (``nil, err`` in Lua);
a wrong argument raises ``TypeError`` (``connmix_tx.lua.args``), which lupa turns into a Lua error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, Callable

from connmix_tx.lua.args import bad_argument, string_arg
from connmix_tx.lua.convert import is_table, lua_type_name, py_to_lua
from connmix_tx.lua.go_url import parse_url
from connmix_tx.lua.php_pack import php_pack, php_unpack


# --- encoding and hashing -----------------------------------------------------------------------


def base64_encode(data: object = None) -> bytes:
    """``s = mix.base64_encode(data)``: standard alphabet, padded."""
    return base64.b64encode(string_arg(data, 1, "base64_encode"))


def base64_decode(text: object = None) -> tuple[bytes | None, bytes | None]:
    """``s, err = mix.base64_decode(s)``: padded or unpadded standard base64; ``nil, err`` if invalid."""
    raw = string_arg(text, 1, "base64_decode").strip()
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True), None
    except (binascii.Error, ValueError) as e:
        return None, f"invalid base64: {e}".encode()


def md5(data: object = None) -> bytes:
    """``s = mix.md5(data)``: the MD5 digest as 32 lower-case hex digits."""
    return hashlib.md5(string_arg(data, 1, "md5")).hexdigest().encode()


def md5_bin(data: object = None) -> bytes:
    """``s = mix.md5_bin(data)``: the raw 16-byte MD5 digest."""
    return hashlib.md5(string_arg(data, 1, "md5_bin")).digest()


def sha1(data: object = None) -> bytes:
    """``s = mix.sha1(data)``: the SHA-1 digest as 40 lower-case hex digits."""
    return hashlib.sha1(string_arg(data, 1, "sha1")).hexdigest().encode()


def sha1_bin(data: object = None) -> bytes:
    """``s = mix.sha1_bin(data)``: the raw 20-byte SHA-1 digest."""
    return hashlib.sha1(string_arg(data, 1, "sha1_bin")).digest()


def str_split(text: object = None, sep: object = None) -> list[bytes]:
    """``t = mix.str_split(s, sep)``: pieces around a plain separator, empty pieces kept.

    ``str_split("a@@b", "@")`` is ``{"a", "", "b"}``, ``str_split("", "@")`` is ``{""}``;
    an empty separator raises.
    """
    data = string_arg(text, 1, "str_split")
    separator = string_arg(sep, 2, "str_split")
    if not separator:
        raise ValueError("bad argument #2 to 'str_split' (empty separator)")
    return data.split(separator)


def bytes_tostring(values: object = None) -> bytes:
    """``s = mix.bytes_tostring(t)``: a string from an array of byte values (``{104, 105}`` -> "hi").

    Every key must be one of ``1..n`` and every value an integer 0..255; anything else raises.
    """
    if not is_table(values):
        raise bad_argument(1, "bytes_tostring", "table", values)
    items = dict(values.items())
    out = bytearray(len(items))
    for key, value in items.items():
        if not isinstance(key, int) or isinstance(key, bool) or not 1 <= key <= len(items):
            raise ValueError("bad argument #1 to 'bytes_tostring' (array expected, got key "
                             f"{lua_type_name(key)} {key!r})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not float(value).is_integer() or not 0 <= value <= 255:
            raise ValueError(f"bad argument #1 to 'bytes_tostring' (byte value expected at index {key})")
        out[key - 1] = int(value)
    return bytes(out)


# --- registration --------------------------------------------------------------------------------


def _with_tables(function: Callable[..., Any], runtime: Callable[[], Any]) -> Callable[..., Any]:
    """Wrap ``function`` so that the lists and dicts it returns become Lua tables."""

    def lua_function(*args: Any) -> Any:
        result = function(*args)
        if isinstance(result, tuple):
            return tuple(py_to_lua(runtime(), value) for value in result)
        return py_to_lua(runtime(), result)

    lua_function.__name__ = lua_function.__qualname__ = function.__name__
    lua_function.__doc__ = function.__doc__
    return lua_function


def extensions(runtime: Callable[[], Any]) -> dict[str, Callable[..., Any]]:
    """The ``mix`` members of this module, for ``Script(extensions=...)``.

    ``runtime()`` returns the ``LuaRuntime`` that builds result tables; it is called only when a
    function runs, so the mapping can be made before the script exists.
    """
    url = _with_tables(parse_url, runtime)
    return {
        "base64_encode": base64_encode,
        "base64_decode": base64_decode,
        "md5": md5,
        "md5_bin": md5_bin,
        "sha1": sha1,
        "sha1_bin": sha1_bin,
        "str_split": _with_tables(str_split, runtime),
        "bytes_tostring": bytes_tostring,
        "php_pack": php_pack,
        "php_unpack": _with_tables(php_unpack, runtime),
        "parse_url": url,
        "url_parse": url,
        "parse_str": url,
    }
