"""The pure members of the ``mix`` library (SPEC 5.4 "Encoding and hashing" and "URLs").

Nothing here touches the engine.  Each function takes Lua values as lupa hands them over
(``bytes`` for strings, ``int``/``float`` for numbers, a lupa table for tables) and returns plain
Python values; ``extensions(runtime)`` wraps them for ``Script(extensions=...)`` and turns the
lists and dicts they return into tables of the script's runtime.

Conventions, as Lua's own library and SPEC 5.4: a runtime failure returns ``None, err``
(``nil, err`` in Lua); a wrong argument type raises ``TypeError``, which lupa turns into a Lua
error.  Where a string is expected a number is accepted too and converted as Lua's ``tostring``
does (``"%.14g"``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import struct
import sys
from typing import Any, Callable

from lupa import luajit21 as lupa

from connmix_tx.lua.convert import lua_type_name, py_to_lua

#: The largest string ``php_pack`` builds (ours: a format like "x2000000000" must not exhaust memory).
MAX_PACK_SIZE = 64 * 1024 * 1024
_INT_MAX = 2**31 - 1

# --- argument helpers ---------------------------------------------------------------------------


def _bad(index: int, function: str, expected: str, value: object) -> TypeError:
    """The error Lua's own library raises for a wrong argument."""
    return TypeError(f"bad argument #{index} to '{function}' ({expected} expected, got {lua_type_name(value)})")


def _string(value: object, index: int, function: str) -> bytes:
    """A string argument; numbers are converted as Lua converts them."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return b"%.14g" % value
    raise _bad(index, function, "string", value)


_NUMERIC = re.compile(rb"\s*[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")


def _number(value: object, index: int, function: str) -> int | float:
    """A number argument; numeric strings are converted as Lua's ``tonumber`` does."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes) and _NUMERIC.fullmatch(value):
        text = value.strip().decode("ascii")
        return int(text, 16) if "x" in text.lower() else float(text)
    raise _bad(index, function, "number", value)


# --- encoding and hashing -----------------------------------------------------------------------


def base64_encode(data: object = None) -> bytes:
    """``s = mix.base64_encode(data)``: standard alphabet, padded."""
    return base64.b64encode(_string(data, 1, "base64_encode"))


def base64_decode(text: object = None) -> tuple[bytes | None, bytes | None]:
    """``s, err = mix.base64_decode(s)``: padded or unpadded standard base64; ``nil, err`` if invalid."""
    raw = _string(text, 1, "base64_decode").strip()
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True), None
    except (binascii.Error, ValueError) as e:
        return None, f"invalid base64: {e}".encode()


def md5(data: object = None) -> bytes:
    """``s = mix.md5(data)``: the MD5 digest as 32 lower-case hex digits."""
    return hashlib.md5(_string(data, 1, "md5")).hexdigest().encode()


def md5_bin(data: object = None) -> bytes:
    """``s = mix.md5_bin(data)``: the raw 16-byte MD5 digest."""
    return hashlib.md5(_string(data, 1, "md5_bin")).digest()


def sha1(data: object = None) -> bytes:
    """``s = mix.sha1(data)``: the SHA-1 digest as 40 lower-case hex digits."""
    return hashlib.sha1(_string(data, 1, "sha1")).hexdigest().encode()


def sha1_bin(data: object = None) -> bytes:
    """``s = mix.sha1_bin(data)``: the raw 20-byte SHA-1 digest."""
    return hashlib.sha1(_string(data, 1, "sha1_bin")).digest()


def str_split(text: object = None, sep: object = None) -> list[bytes]:
    """``t = mix.str_split(s, sep)``: pieces around a plain separator, empty pieces kept.

    ``str_split("a@@b", "@")`` is ``{"a", "", "b"}``, ``str_split("", "@")`` is ``{""}``;
    an empty separator raises.
    """
    data = _string(text, 1, "str_split")
    separator = _string(sep, 2, "str_split")
    if not separator:
        raise ValueError("bad argument #2 to 'str_split' (empty separator)")
    return data.split(separator)


def bytes_tostring(values: object = None) -> bytes:
    """``s = mix.bytes_tostring(t)``: a string from an array of byte values (``{104, 105}`` -> "hi").

    Every key must be one of ``1..n`` and every value an integer 0..255; anything else raises.
    """
    if lupa.lua_type(values) != "table":
        raise _bad(1, "bytes_tostring", "table", values)
    items = dict(values.items())  # type: ignore[attr-defined]
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


# --- PHP pack / unpack ---------------------------------------------------------------------------

_MACHINE = sys.byteorder
#: Integer codes: size in bytes, byte order, signed when unpacked.  PHP integers are 64-bit signed,
#: so the 64-bit codes all unpack as signed (Q/J/P >= 2^63 come back negative, as in PHP).
_INTEGERS: dict[str, tuple[int, str, bool]] = {
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
    format_ = _string(fmt, 1, "php_pack")
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
                count = len(_string(args[used], used + 2, "php_pack")) + (code == "Z")
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
            value = _string(args[first], first + 2, "php_pack")
            keep = count if code != "Z" else max(0, count - 1)
            put(value[:keep].ljust(count, b" " if code == "A" else b"\0"))
        elif code in "hH":
            digits = _string(args[first], first + 2, "php_pack")[:count]
            put(_hex_nibbles(digits, low_first=code == "h"))
        elif code in _INTEGERS:
            size, order, _ = _INTEGERS[code]
            for k in range(first, first + count):
                value64 = _to_int64(_number(args[k], k + 2, "php_pack"))
                put((value64 & ((1 << 8 * size) - 1)).to_bytes(size, order))  # type: ignore[arg-type]
        elif code in _FLOATS:
            for k in range(first, first + count):
                put(_pack_float(_FLOATS[code], float(_number(args[k], k + 2, "php_pack"))))
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
    format_ = _string(fmt, 1, "php_unpack")
    input_ = _string(data, 2, "php_unpack")
    if offset is not None:
        start = _number(offset, 3, "php_unpack")
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
                    result[key] = int.from_bytes(chunk, order, signed=signed)  # type: ignore[arg-type]
            pos += size
            number += 1
    return result


# --- URLs (Go's net/url) -------------------------------------------------------------------------

_HOST, _ZONE, _PATH, _USER, _QUERY, _FRAGMENT = range(6)
_HEX = b"0123456789abcdefABCDEF"


class _UrlError(ValueError):
    """Go's ``url.Parse`` would fail."""


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v", '"': '\\"', "\\": "\\\\"}


def _go_quote(value: bytes) -> str:
    """Go's ``strconv.Quote`` (used in Go's error texts), for the characters URLs can hold."""
    out = []
    for ch in value.decode("utf-8", "surrogateescape"):
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif "\udc80" <= ch <= "\udcff":  # an invalid UTF-8 byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def _should_escape(c: int, mode: int) -> bool:
    """Go's ``shouldEscape``."""
    ch = chr(c)
    if ch.isascii() and ch.isalnum():
        return False
    if mode in (_HOST, _ZONE) and ch in "!$&'()*+,;=:[]<>\"":
        return False
    if ch in "-_.~":
        return False
    if ch in "$&+,/:;=?@":
        if mode == _PATH:
            return ch == "?"
        if mode == _USER:
            return ch in "@/?:"
        if mode == _QUERY:
            return True
        if mode == _FRAGMENT:
            return False
    if mode == _FRAGMENT and ch in "!()*":
        return False
    return True


def _unescape(s: bytes, mode: int) -> bytes:
    """Go's ``unescape``: validate, then decode ``%XX`` (and ``+`` in query components)."""
    i = 0
    while i < len(s):
        c = s[i]
        if c == 0x25:  # "%"
            if i + 2 >= len(s) or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                raise _UrlError(f"invalid URL escape {_go_quote(s[i:i + 3])}")
            byte = int(s[i + 1:i + 3], 16)
            if mode == _HOST and byte < 0x80 and s[i:i + 3] != b"%25":
                raise _UrlError(f"invalid URL escape {_go_quote(s[i:i + 3])}")
            if mode == _ZONE and s[i:i + 3] != b"%25" and byte != 0x20 and _should_escape(byte, _HOST):
                raise _UrlError(f"invalid URL escape {_go_quote(s[i:i + 3])}")
            i += 3
            continue
        if mode in (_HOST, _ZONE) and c < 0x80 and _should_escape(c, mode):
            raise _UrlError(f"invalid character {_go_quote(s[i:i + 1])} in host name")
        i += 1
    pattern = rb"%[0-9a-fA-F]{2}|\+" if mode == _QUERY else rb"%[0-9a-fA-F]{2}"
    return re.sub(pattern, lambda m: b" " if m[0] == b"+" else bytes([int(m[0][1:], 16)]), s)


def _escape(s: bytes, mode: int) -> bytes:
    return b"".join(b"%%%02X" % c if _should_escape(c, mode) else bytes([c]) for c in s)


def _valid_port(colon_port: bytes) -> bool:
    """Go's ``validOptionalPort``: empty, or ":" followed by digits only."""
    return colon_port == b"" or (colon_port[:1] == b":" and all(0x30 <= c <= 0x39 for c in colon_port[1:]))


def _parse_host(host: bytes) -> bytes:
    """Go's ``parseHost``: ``host[:port]``, IPv6 literals in brackets (zone after ``%25``)."""
    if host.startswith(b"["):
        end = host.rfind(b"]")
        if end < 0:
            raise _UrlError("missing ']' in host")
        if not _valid_port(host[end + 1:]):
            raise _UrlError(f"invalid port {_go_quote(host[end + 1:])} after host")
        zone = host[:end].find(b"%25")
        if zone >= 0:
            return _unescape(host[:zone], _HOST) + _unescape(host[zone:end], _ZONE) \
                + _unescape(host[end:], _HOST)
    else:
        colon = host.rfind(b":")
        if colon >= 0 and not _valid_port(host[colon:]):
            raise _UrlError(f"invalid port {_go_quote(host[colon:])} after host")
    return _unescape(host, _HOST)


_USERINFO = re.compile(rb"[A-Za-z0-9\-._:~!$&'()*+,;=%@]*")


def _parse_authority(authority: bytes) -> tuple[bytes, bytes]:
    """Go's ``parseAuthority``: (userinfo as written, host)."""
    at = authority.rfind(b"@")
    host = _parse_host(authority[at + 1:])
    if at < 0:
        return b"", host
    userinfo = authority[:at]
    if not _USERINFO.fullmatch(userinfo):
        raise _UrlError("net/url: invalid userinfo")
    for part in userinfo.split(b":", 1):
        _unescape(part, _USER)
    return userinfo, host


def _scheme(raw: bytes) -> tuple[bytes, bytes]:
    """Go's ``getScheme``."""
    for i, c in enumerate(raw):
        if 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
            continue
        if 0x30 <= c <= 0x39 or c in b"+-.":
            if i == 0:
                return b"", raw
            continue
        if c == 0x3A:
            if i == 0:
                raise _UrlError("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return b"", raw
    return b"", raw


def _parse(raw: bytes) -> dict[str, Any]:
    """Go's ``parse(rawURL, viaRequest=false)`` for the part before ``#``."""
    if re.search(rb"[\x00-\x1f\x7f]", raw):
        raise _UrlError("net/url: invalid control character in URL")
    url: dict[str, Any] = {"scheme": b"", "opaque": b"", "user": b"", "host": b"", "path": b"",
                           "raw_path": b"", "force_query": False, "raw_query": b""}
    if raw == b"*":
        url["path"] = b"*"
        return url
    scheme, rest = _scheme(raw)
    url["scheme"] = scheme.lower()
    if rest.endswith(b"?") and rest.count(b"?") == 1:
        url["force_query"], rest = True, rest[:-1]
    else:
        rest, _, url["raw_query"] = rest.partition(b"?")
    if not rest.startswith(b"/"):
        if scheme:
            url["opaque"] = rest  # a rootless path ("mailto:bob@example.com") is opaque
            return url
        if b":" in rest.partition(b"/")[0]:
            raise _UrlError("first path segment in URL cannot contain colon")
    if rest.startswith(b"//") and (scheme or not rest.startswith(b"///")):
        authority, slash, tail = rest[2:].partition(b"/")
        rest = slash + tail
        url["user"], url["host"] = _parse_authority(authority)
    url["path"] = _unescape(rest, _PATH)
    # SPEC 5.4: raw_path is the path as written, "" when that equals the decoded path.
    url["raw_path"] = rest if rest != url["path"] else b""
    return url


def _first_values(raw_query: bytes) -> dict[bytes, bytes]:
    """Go's ``url.ParseQuery`` keeping the first value of each key; bad pairs are skipped."""
    values: dict[bytes, bytes] = {}
    for pair in raw_query.split(b"&"):
        if not pair or b";" in pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            values.setdefault(_unescape(key, _QUERY), _unescape(value, _QUERY))
        except _UrlError:
            continue
    return values


def parse_url(url: object = None) -> tuple[dict[str, Any] | None, bytes | None]:
    """``t, err = mix.parse_url(url)`` (also ``url_parse``, ``parse_str``): Go's ``url.Parse``.

    Returns the fields of Go's ``url.URL`` in snake_case (``scheme opaque user host path raw_path
    force_query raw_query fragment raw_fragment``) and ``query``, the first decoded value of each
    key.  ``user`` is the userinfo as written.  Relative references parse with empty scheme and
    host.  An unparsable URL gives ``nil, err`` with Go's error text.
    """
    raw = _string(url, 1, "parse_url")
    before, hash_, fragment = raw.partition(b"#")
    try:
        fields = _parse(before)
    except _UrlError as e:
        return None, f"parse {_go_quote(before)}: {e}".encode()
    fields["fragment"] = fields["raw_fragment"] = b""
    if hash_ and fragment:
        try:
            decoded = _unescape(fragment, _FRAGMENT)
        except _UrlError as e:
            return None, f"parse {_go_quote(raw)}: {e}".encode()
        fields["fragment"] = decoded
        fields["raw_fragment"] = fragment if _escape(decoded, _FRAGMENT) != fragment else b""
    fields["query"] = _first_values(fields["raw_query"])
    return fields, None


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
