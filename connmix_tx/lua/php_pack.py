"""``mix.php_pack`` / ``mix.php_unpack``: PHP's ``pack`` and ``unpack``, byte for byte.

The format codes, their sizes and byte orders are PHP 8's on x86-64 (tests/test_lua_stdlib.py
holds PHP's own outputs).  A bad format, missing arguments or short data return ``nil, err``;
a wrong argument type raises a Lua error.  ``MAX_PACK_SIZE`` bounds what a format may build.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from typing import Any, Literal

from connmix_tx.lua.args import number_arg, string_arg

__all__ = ["MAX_PACK_SIZE", "php_pack", "php_unpack"]

#: The largest string ``php_pack`` builds (ours: a format like "x2000000000" must not exhaust memory).
MAX_PACK_SIZE = 64 * 1024 * 1024
_INT_MAX = 2**31 - 1

_MACHINE: Literal["little", "big"] = sys.byteorder
#: Integer codes: size in bytes, byte order, signed when unpacked.  PHP integers are 64-bit signed,
#: so the 64-bit codes all unpack as signed (Q/J/P >= 2^63 come back negative, as in PHP).
_INTEGERS: dict[str, tuple[int, Literal["little", "big"], bool]] = {
    "c": (1, "little", True), "C": (1, "little", False),
    "s": (2, _MACHINE, True), "S": (2, _MACHINE, False), "n": (2, "big", False), "v": (2, "little", False),
    "i": (4, _MACHINE, True), "I": (4, _MACHINE, False),
    "l": (4, _MACHINE, True), "L": (4, _MACHINE, False), "N": (4, "big", False), "V": (4, "little", False),
    "q": (8, _MACHINE, True), "Q": (8, _MACHINE, True), "J": (8, "big", True), "P": (8, "little", True),
}
_FLOATS = {"f": "=f", "g": "<f", "G": ">f", "d": "=d", "e": "<d", "E": ">d"}
_STRINGS = "aAZhH"


class _FormatError(ValueError):
    """A bad format, missing arguments or short data: ``nil, err`` in Lua."""


def _count(fmt: bytes, i: int, code: str) -> tuple[int, int]:
    """The repeat count at ``fmt[i:]``: 1 when absent, -1 for ``*``; and the index after it."""
    if i < len(fmt) and fmt[i] == 0x2A:  # "*"
        return -1, i + 1
    j = i
    while j < len(fmt) and 0x30 <= fmt[j] <= 0x39:
        j += 1
    if j == i:
        return 1, i
    count = int(fmt[i:j])
    if count > _INT_MAX:
        raise _FormatError(f"Type {code}: integer overflow")
    return count, j


def _to_int64(value: int | float) -> int:
    """PHP's conversion of a number to its 64-bit integer (NaN and infinities give 0)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return 0
        value = int(value)
    return value & 0xFFFFFFFFFFFFFFFF


def _pack_float(fmt: str, value: float) -> bytes:
    try:
        return struct.pack(fmt, value)
    except OverflowError:  # (float) of a huge double is an infinity in C
        return struct.pack(fmt, math.copysign(math.inf, value))


def _hex_nibbles(digits: bytes, low_first: bool) -> bytes:
    """PHP ``h`` / ``H``: two hex digits per byte; an invalid digit counts as 0, as PHP does."""
    out = bytearray()
    for k in range(0, len(digits), 2):
        pair = [int(chr(d), 16) if chr(d) in "0123456789abcdefABCDEF" else 0 for d in digits[k:k + 2]]
        first, second = pair[0], pair[1] if len(pair) > 1 else 0
        out.append(first | second << 4 if low_first else first << 4 | second)
    return bytes(out)


def php_pack(fmt: object = None, *args: object) -> tuple[bytes | None, bytes | None]:
    """``s, err = mix.php_pack(format, ...)``: PHP ``pack()``.

    Codes ``a A Z h H c C s S n v i I l L N V q Q J P f g G d e E x X @`` with repeat counts and
    ``*``; machine order is this host's.  Unknown codes and missing arguments give ``nil, err``;
    PHP's warnings (unused arguments, bad hex digits, ``*`` on ``x X @``) are not errors, as in PHP.
    """
    format_ = string_arg(fmt, 1, "php_pack")
    try:
        return _pack(format_, args), None
    except _FormatError as e:
        return None, str(e).encode()


def _pack(fmt: bytes, args: tuple[object, ...]) -> bytes:
    # First pass, as PHP: parse the codes and check that the arguments suffice.
    codes: list[tuple[str, int, int]] = []  # code, count, index of its first argument
    used = 0
    i = 0
    while i < len(fmt):
        code = chr(fmt[i])
        count, i = _count(fmt, i + 1, code)
        first = used
        if code in "xX@":
            count = 1 if count < 0 else count  # PHP warns "'*' ignored"
        elif code in _STRINGS:
            if used >= len(args):
                raise _FormatError(f"Type {code}: not enough arguments")
            if count < 0:
                count = len(string_arg(args[used], used + 2, "php_pack")) + (code == "Z")
            used += 1
        elif code in _INTEGERS or code in _FLOATS:
            if count < 0:
                count = len(args) - used
            used += count
            if used > len(args):
                raise _FormatError(f"Type {code}: too few arguments")
        else:
            raise _FormatError(f"Type {code}: unknown format code")
        codes.append((code, count, first))

    out = bytearray()
    pos = 0

    def put(chunk: bytes) -> None:
        nonlocal pos
        if pos + len(chunk) > MAX_PACK_SIZE:
            raise _FormatError(f"result larger than {MAX_PACK_SIZE} bytes")
        out[pos:pos + len(chunk)] = chunk
        pos += len(chunk)

    for code, count, first in codes:
        if code in "aAZ":
            if count > MAX_PACK_SIZE:
                raise _FormatError(f"result larger than {MAX_PACK_SIZE} bytes")
            value = string_arg(args[first], first + 2, "php_pack")
            keep = count if code != "Z" else max(0, count - 1)
            put(value[:keep].ljust(count, b" " if code == "A" else b"\0"))
        elif code in "hH":
            digits = string_arg(args[first], first + 2, "php_pack")[:count]
            put(_hex_nibbles(digits, low_first=code == "h"))
        elif code in _INTEGERS:
            size, order, _ = _INTEGERS[code]
            for k in range(first, first + count):
                value64 = _to_int64(number_arg(args[k], k + 2, "php_pack"))
                put((value64 & ((1 << 8 * size) - 1)).to_bytes(size, order))
        elif code in _FLOATS:
            for k in range(first, first + count):
                put(_pack_float(_FLOATS[code], float(number_arg(args[k], k + 2, "php_pack"))))
        elif code == "x":
            put(bytes(min(count, MAX_PACK_SIZE + 1)))
        elif code == "X":
            pos = max(pos - count, 0)
        elif code == "@":
            if count > pos:
                put(bytes(min(count - pos, MAX_PACK_SIZE + 1)))
            else:
                pos = count
    return bytes(out[:pos])


def php_unpack(fmt: object = None, data: object = None, offset: object = None) -> tuple[dict | None, bytes | None]:
    """``t, err = mix.php_unpack(format, data[, offset])``: PHP ``unpack()``.

    Elements are separated by ``/`` and named after their code and count (``"Nlen/a*body"`` ->
    ``{len = ..., body = ...}``); a name with a count > 1 gets ``1, 2, ...`` appended; unnamed
    elements get the number keys ``1, 2, ...`` (a later unnamed element replaces an earlier one, as
    in PHP).  Short data or a bad format give ``nil, err``.
    """
    format_ = string_arg(fmt, 1, "php_unpack")
    input_ = string_arg(data, 2, "php_unpack")
    if offset is not None:
        start = number_arg(offset, 3, "php_unpack")
        if not float(start).is_integer() or not 0 <= start <= len(input_):
            return None, b"offset out of range"
        input_ = input_[int(start):]
    try:
        return _unpack(format_, input_), None
    except _FormatError as e:
        return None, str(e).encode()


_PHP_INTEGER_KEY = re.compile(rb"-?[1-9][0-9]{0,18}|0")


def _key(name: bytes, number: int | None) -> bytes | int:
    """PHP's array key: ``name`` + ``number``; a canonical decimal integer becomes a number key."""
    if number is not None:
        name += str(number).encode()
    if _PHP_INTEGER_KEY.fullmatch(name) and -(2**63) <= int(name) < 2**63:
        return int(name)
    return name


def _unpack(fmt: bytes, data: bytes) -> dict:
    result: dict[bytes | int, Any] = {}
    pos = 0
    i = 0
    while i < len(fmt):
        code = chr(fmt[i])
        count, i = _count(fmt, i + 1, code)
        end = fmt.find(b"/", i)
        end = len(fmt) if end < 0 else end
        name, i = fmt[i:end][:200], end + 1
        have = len(data) - pos
        if code == "X":  # back count bytes (at most to the start); "*" counts as 1
            pos = max(pos - (1 if count < 0 else count), 0)
            continue
        if code == "@":  # absolute position; beyond the end PHP only warns
            if count < 0:
                pos = 0
            elif 0 < count <= len(data):
                pos = count
            continue
        if code in _STRINGS:
            size = count if code in "aAZ" else ((count + 1) // 2 if count > 0 else count)
            if size >= 0 and size > have:
                raise _FormatError(f"Type {code}: not enough input, need {size}, have {have}")
            chunk = data[pos:] if size < 0 else data[pos:pos + size]
            key = _key(name, None) if name else 1
            if code == "a":
                result[key] = chunk
            elif code == "A":
                result[key] = chunk.rstrip(b"\0 \t\r\n")
            elif code == "Z":
                result[key] = chunk.split(b"\0", 1)[0]
            else:
                digits = len(chunk) * 2 - (count % 2 if count > 0 and chunk else 0)
                text = chunk.hex() if code == "H" else "".join(f"{b & 15:x}{b >> 4:x}" for b in chunk)
                result[key] = text[:digits].encode()
            # PHP advances a/A/Z by what they read, h/H by their size: "H*" steps back one byte.
            pos = max(pos + (len(chunk) if code in "aAZ" else size), 0)
            continue
        if code == "x":
            size = 1
        elif code in _INTEGERS:
            size = _INTEGERS[code][0]
        elif code in _FLOATS:
            size = struct.calcsize(_FLOATS[code])
        else:
            raise _FormatError(f"Invalid format type {code}")
        number = 0
        while number != count:
            if pos + size > len(data):
                if count < 0:
                    break
                raise _FormatError(f"Type {code}: not enough input, need {size}, have {len(data) - pos}")
            chunk = data[pos:pos + size]
            if code != "x":
                key = _key(name, None if count == 1 else number + 1) if name else number + 1
                if code in _FLOATS:
                    result[key] = struct.unpack(_FLOATS[code], chunk)[0]
                else:
                    _, order, signed = _INTEGERS[code]
                    result[key] = int.from_bytes(chunk, order, signed=signed)
            pos += size
            number += 1
    return result
