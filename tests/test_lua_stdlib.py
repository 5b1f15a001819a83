"""Tests for the pure ``mix`` functions (docs/lua-api.md, "Encoding and hashing" and "URLs").

Every function is called through Lua, inside ``on_message`` of a real ``Script`` wired to real
engine objects, so what is asserted is what a script sees: ``nil, err`` returns, tables with
string keys, 1-based arrays, Lua errors for wrong argument types.  Expected values come from the
standards (RFC 4648, RFC 1321, FIPS 180) and from what PHP and Go produce.
"""

from __future__ import annotations

import re

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from lupa import luajit21 as lupa

from luahelpers import Engine, make_engine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    """A websocket script whose on_message runs the message text as Lua."""
    return make_engine(tmp_path)


def lua(engine: Engine, code: str) -> tuple:
    """Run ``code`` inside on_message (no current connection) and return its results."""
    return engine.message(None, code).values


def raises(engine: Engine, call: str) -> bytes:
    """``pcall(<call>)`` must fail with a Lua error string naming the calling line
    (``exec:1: bad argument ...``); return the message without that location."""
    # Called from a Lua function (not straight from pcall, a C function with no line to name).
    ok, message = lua(engine, f"local ok, err = pcall(function(f, ...) local r = f(...) return r end, {call}) "
                              "return ok, err")
    assert ok is False
    assert isinstance(message, bytes), message
    location, _, text = message.partition(b": ")
    assert re.fullmatch(rb"exec:\d+", location), message
    return text


def lit(data: bytes | str) -> str:
    """A Lua string literal for ``data`` (any bytes)."""
    raw = data.encode() if isinstance(data, str) else data
    return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'


def py(value: Any) -> Any:
    """A Lua table as a dict with its real keys (so arrays show as {1: ..., 2: ...})."""
    if lupa.lua_type(value) == "table":
        return {k: py(v) for k, v in value.items()}
    return value


def native(fmt: str, *values: Any) -> bytes:
    """Machine byte order with standard sizes (PHP's s S i I l L q Q f d)."""
    return struct.pack("=" + fmt, *values)


# --- base64 (RFC 4648 section 10) -------------------------------------------------------------


RFC4648 = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="),
           ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]


@pytest.mark.parametrize("plain, encoded", RFC4648)
def test_base64_rfc4648_vectors(engine: Engine, plain: str, encoded: str) -> None:
    assert lua(engine, f"return mix.base64_encode({lit(plain)})") == (encoded.encode(),)
    assert lua(engine, f"return mix.base64_decode({lit(encoded)})") == (plain.encode(), None)
    assert lua(engine, f"return mix.base64_decode({lit(encoded.rstrip('='))})") == (plain.encode(), None)


def test_base64_binary_invalid_and_types(engine: Engine) -> None:
    every_byte = bytes(range(256))
    assert lua(engine, f"return mix.base64_decode(mix.base64_encode({lit(every_byte)}))") == (every_byte, None)
    value, err = lua(engine, "return mix.base64_decode('Zm9v!!')")
    assert value is None and err.startswith(b"invalid base64")
    assert lua(engine, "return mix.base64_encode(12)") == (b"MTI=",)  # numbers as Lua strings
    assert raises(engine, "mix.base64_encode, {}") == b"bad argument #1 to 'base64_encode' (string expected, got table)"


def test_shipped_entry_encodes_binary_messages(tmp_path: Path) -> None:
    """lua/entry.websocket.lua queues binary frames base64-encoded (docs/lua-api.md)."""
    source = (REPO / "lua" / "entry.websocket.lua").read_text(encoding="utf-8")
    engine = make_engine(tmp_path, source, stubs=False)
    conn, _ = engine.connect()
    engine.message(conn, b"\x00\xff\x10", kind=b"binary").values  # finished without error
    [(_, data)] = engine.queues.topics["foo"].messages
    assert json.loads(data)["msg"] == {"type": "binary", "data": "AP8Q", "finish": True}


# --- md5 (RFC 1321 appendix A.5) and sha1 (FIPS 180-2 appendix A) -----------------------------


RFC1321 = [
    ("", "d41d8cd98f00b204e9800998ecf8427e"),
    ("a", "0cc175b9c0f1b6a831c399e269772661"),
    ("abc", "900150983cd24fb0d6963f7d28e17f72"),
    ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
    ("abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"),
    ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", "d174ab98d277d9f5a5611c2c9f419d9f"),
    ("1234567890" * 8, "57edf4a22be3c955ac49da2e2107b67a"),
]

FIPS180 = [
    ("abc", "a9993e364706816aba3e25717850c26c9cd0d89d"),
    ("", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "84983e441c3bd26ebaae4aa1f95129e5e54670f1"),
]


@pytest.mark.parametrize("message, digest", RFC1321)
def test_md5_rfc1321_vectors(engine: Engine, message: str, digest: str) -> None:
    assert lua(engine, f"return mix.md5({lit(message)})") == (digest.encode(),)


@pytest.mark.parametrize("message, digest", RFC1321[:3])
def test_md5_bin(engine: Engine, message: str, digest: str) -> None:
    code = f"local d = mix.md5_bin({lit(message)}) return d, #d"
    assert lua(engine, code) == (bytes.fromhex(digest), 16)


@pytest.mark.parametrize("message, digest", FIPS180)
def test_sha1_fips180_vectors(engine: Engine, message: str, digest: str) -> None:
    assert lua(engine, f"return mix.sha1({lit(message)})") == (digest.encode(),)


@pytest.mark.parametrize("message, digest", FIPS180)
def test_sha1_bin(engine: Engine, message: str, digest: str) -> None:
    code = f"local d = mix.sha1_bin({lit(message)}) return d, #d"
    assert lua(engine, code) == (bytes.fromhex(digest), 20)


def test_hashes_are_binary_safe_and_check_types(engine: Engine) -> None:
    data = bytes(range(256))
    for name in ("md5", "sha1"):
        code = f"return mix.{name}({lit(data)}), mix.{name}_bin({lit(data)})"
        assert lua(engine, code) == (hashlib.new(name, data).hexdigest().encode(), hashlib.new(name, data).digest())
    assert lua(engine, "return mix.sha1(123)") == lua(engine, "return mix.sha1('123')")
    for name in ("md5", "md5_bin", "sha1", "sha1_bin"):
        assert raises(engine, f"mix.{name}, nil") == f"bad argument #1 to '{name}' (string expected, got nil)".encode()


# --- str_split ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, sep, pieces", [
    ("a@@b", "@", [b"a", b"", b"b"]),
    ("", "@", [b""]),
    ("a@b@", "@", [b"a", b"b", b""]),
    ("abc", "@", [b"abc"]),
    ("a.b.c", ".", [b"a", b"b", b"c"]),  # plain, not a pattern
    ("k1=v1&&k2=v2", "&&", [b"k1=v1", b"k2=v2"]),
])
def test_str_split(engine: Engine, text: str, sep: str, pieces: list[bytes]) -> None:
    [table] = lua(engine, f"return mix.str_split({lit(text)}, {lit(sep)})")
    assert py(table) == {i + 1: piece for i, piece in enumerate(pieces)}
    assert lua(engine, f"return #mix.str_split({lit(text)}, {lit(sep)})") == (len(pieces),)


def test_str_split_empty_separator_raises(engine: Engine) -> None:
    assert raises(engine, "mix.str_split, 'abc', ''") == b"bad argument #2 to 'str_split' (empty separator)"
    assert raises(engine, "mix.str_split, 'abc'") == b"bad argument #2 to 'str_split' (string expected, got nil)"


# --- bytes_tostring -------------------------------------------------------------------------------


def test_bytes_tostring(engine: Engine) -> None:
    assert lua(engine, "return mix.bytes_tostring({104, 105})") == (b"hi",)
    assert lua(engine, "return mix.bytes_tostring({})") == (b"",)
    assert lua(engine, "return mix.bytes_tostring({0, 255, 10})") == (b"\x00\xff\n",)
    code = "local t = {} for i = 0, 255 do t[i + 1] = i end return mix.bytes_tostring(t)"
    assert lua(engine, code) == (bytes(range(256)),)


@pytest.mark.parametrize("table", ["{256}", "{-1}", "{1.5}", "{'a'}", "{true}", "{1, nil, 3}",
                                   "{1, x = 2}", "'hi'", "nil"])
def test_bytes_tostring_rejects_other_values(engine: Engine, table: str) -> None:
    assert raises(engine, f"mix.bytes_tostring, {table}").startswith(b"bad argument #1 to 'bytes_tostring' (")


# --- php_pack: byte-exact against PHP (x86-64 PHP 8) --------------------------------------------


PACK = [
    # strings
    ('"a5", "ab"', b"ab\x00\x00\x00"),
    ('"a*", "abc"', b"abc"),
    ('"a2", "abc"', b"ab"),
    ('"a", "xyz"', b"x"),
    ('"A5", "ab"', b"ab   "),
    ('"A*", "ab"', b"ab"),
    ('"Z5", "ab"', b"ab\x00\x00\x00"),
    ('"Z2", "aa"', b"a\x00"),
    ('"Z*", "aa"', b"aa\x00"),
    ('"H*", "41"', b"A"),
    ('"H*", "4142"', b"AB"),
    ('"H3", "414"', b"A@"),
    ('"H*", "4"', b"@"),
    ('"h*", "14"', b"A"),
    ('"h3", "123"', b"\x21\x03"),
    # integers
    ('"c", -1', b"\xff"),
    ('"c", 321', b"A"),  # only the low byte
    ('"C*", 1, 2, 3', b"\x01\x02\x03"),
    ('"C3", 65, 66, 67', b"ABC"),
    ('"s", -2', native("h", -2)),
    ('"S", 0x1234', native("H", 0x1234)),
    ('"n", 0x1234', b"\x12\x34"),
    ('"n", 65537', b"\x00\x01"),
    ('"v", 0x1234', b"\x34\x12"),
    ('"i", -3', native("i", -3)),
    ('"I", 7', native("I", 7)),
    ('"l", -1', b"\xff\xff\xff\xff"),
    ('"L", 1', native("L", 1)),
    ('"N", 1', b"\x00\x00\x00\x01"),
    ('"N", 0xdeadbeef', b"\xde\xad\xbe\xef"),
    ('"N", "16"', b"\x00\x00\x00\x10"),  # numeric strings are numbers
    ('"N", 1.9', b"\x00\x00\x00\x01"),  # truncated towards zero
    ('"V", 1', b"\x01\x00\x00\x00"),
    ('"q", -2', native("q", -2)),
    ('"Q", 1', native("Q", 1)),
    ('"J", 1', b"\x00\x00\x00\x00\x00\x00\x00\x01"),
    ('"J", 2^53', b"\x00\x20\x00\x00\x00\x00\x00\x00"),
    ('"P", 1', b"\x01\x00\x00\x00\x00\x00\x00\x00"),
    # floats
    ('"f", 1.5', native("f", 1.5)),
    ('"g", 1.5', b"\x00\x00\xc0\x3f"),
    ('"G", 1.5', b"\x3f\xc0\x00\x00"),
    ('"d", 1.5', native("d", 1.5)),
    ('"e", 1.5', b"\x00\x00\x00\x00\x00\x00\xf8\x3f"),
    ('"E", 1.5', b"\x3f\xf8\x00\x00\x00\x00\x00\x00"),
    # positioning
    ('"x3"', b"\x00\x00\x00"),
    ('"Nx", 1', b"\x00\x00\x00\x01\x00"),
    ('"NX", 1', b"\x00\x00\x00"),
    ('"nXC", 0x4142, 0x43', b"AC"),
    ('"C@4", 65', b"A\x00\x00\x00"),
    ('"N@2", 1', b"\x00\x00"),
    ('"x2X1@5"', b"\x00" * 5),
    ('"x*"', b"\x00"),  # PHP: "'*' ignored"
    # several codes
    ('"nvc*", 0x1234, 0x5678, 1, -1', b"\x12\x34\x78\x56\x01\xff"),
    ('"Na*", 3, "abc"', b"\x00\x00\x00\x03abc"),
    ('""', b""),
]


@pytest.mark.parametrize("args, expected", PACK, ids=[a for a, _ in PACK])
def test_php_pack_matches_php(engine: Engine, args: str, expected: bytes) -> None:
    assert lua(engine, f"return mix.php_pack({args})") == (expected, None)


@pytest.mark.parametrize("args, err", [
    ('"Y"', b"Type Y: unknown format code"),
    ('"N"', b"Type N: too few arguments"),
    ('"N2", 1', b"Type N: too few arguments"),
    ('"a"', b"Type a: not enough arguments"),
    ('"Na", 1', b"Type a: not enough arguments"),
    ('"x99999999999"', b"Type x: integer overflow"),
    ('"x100000000"', b"result larger than 67108864 bytes"),
])
def test_php_pack_errors_return_nil_err(engine: Engine, args: str, err: bytes) -> None:
    assert lua(engine, f"return mix.php_pack({args})") == (None, err)


def test_php_pack_wrong_argument_types_raise(engine: Engine) -> None:
    assert raises(engine, "mix.php_pack, 'N', {}") == b"bad argument #2 to 'php_pack' (number expected, got table)"
    assert raises(engine, "mix.php_pack, 'NN', 1, 'x'") \
        == b"bad argument #3 to 'php_pack' (number expected, got string)"
    assert raises(engine, "mix.php_pack, 'a', true") == b"bad argument #2 to 'php_pack' (string expected, got boolean)"
    assert raises(engine, "mix.php_pack, {}") == b"bad argument #1 to 'php_pack' (string expected, got table)"


# --- php_unpack ----------------------------------------------------------------------------------


UNPACK = [
    ("Nlen/a*body", b"\x00\x00\x00\x03abc", {b"len": 3, b"body": b"abc"}),
    ("C*", b"\x01\x02\x03", {1: 1, 2: 2, 3: 3}),
    ("C", b"\x07", {1: 7}),
    ("c2chars/nint", b"\xff\x01\x00\x05", {b"chars1": -1, b"chars2": 1, b"int": 5}),
    ("C2/n", b"\x01\x02\x00\x03", {1: 3, 2: 2}),  # unnamed keys restart at 1, as in PHP
    ("a3", b"abcdef", {1: b"abc"}),
    ("a*", b"ab\x00", {1: b"ab\x00"}),
    ("A*", b"ab  \x00\n", {1: b"ab"}),
    ("A5x", b"ab   ", {b"x": b"ab"}),
    ("Z*", b"ab\x00cd", {1: b"ab"}),
    ("Z5s/Cn", b"ab\x00cd\x09", {b"s": b"ab", b"n": 9}),
    ("H*", b"\xab\xcd", {1: b"abcd"}),
    ("H3", b"\xab\xcd", {1: b"abc"}),
    ("h*", b"\xab\xcd", {1: b"badc"}),
    ("c", b"\x80", {1: -128}),
    ("s", native("h", -2), {1: -2}),
    ("S", native("H", 0xFFFE), {1: 0xFFFE}),
    ("n", b"\xff\xfe", {1: 0xFFFE}),
    ("v", b"\xfe\xff", {1: 0xFFFE}),
    ("i", native("i", -3), {1: -3}),
    ("I", native("I", 0xFFFFFFFF), {1: 0xFFFFFFFF}),
    ("l", b"\xff\xff\xff\xff", {1: -1}),
    ("L", b"\xff\xff\xff\xff", {1: 0xFFFFFFFF}),
    ("N", b"\xde\xad\xbe\xef", {1: 0xDEADBEEF}),
    ("V", b"\xef\xbe\xad\xde", {1: 0xDEADBEEF}),
    ("q", native("q", -2), {1: -2}),
    ("Q", native("Q", 2**40), {1: 2**40}),
    ("J", b"\x00\x20\x00\x00\x00\x00\x00\x00", {1: 2**53}),
    ("J", b"\x80\x00\x00\x00\x00\x00\x00\x00", {1: -(2**63)}),  # PHP integers are signed
    ("P", b"\x01\x00\x00\x00\x00\x00\x00\x00", {1: 1}),
    ("f", native("f", 1.5), {1: 1.5}),
    ("g", b"\x00\x00\xc0\x3f", {1: 1.5}),
    ("G", b"\x3f\xc0\x00\x00", {1: 1.5}),
    ("d", native("d", -0.25), {1: -0.25}),
    ("e", b"\x00\x00\x00\x00\x00\x00\xf8\x3f", {1: 1.5}),
    ("E", b"\x3f\xf8\x00\x00\x00\x00\x00\x00", {1: 1.5}),
    ("Ca/x/Cb", b"\x01\x02\x03", {b"a": 1, b"b": 3}),
    ("Ca/X/Cb", b"\x07", {b"a": 7, b"b": 7}),
    ("@2/Cv", b"\x01\x02\x03", {b"v": 3}),
    ("C*", b"", {}),
    ("", b"abc", {}),
]


@pytest.mark.parametrize("fmt, data, expected", UNPACK, ids=[f for f, _, _ in UNPACK])
def test_php_unpack_matches_php(engine: Engine, fmt: str, data: bytes, expected: dict) -> None:
    table, err = lua(engine, f"return mix.php_unpack({lit(fmt)}, {lit(data)})")
    assert err is None and py(table) == expected


def test_php_unpack_fields_from_lua(engine: Engine) -> None:
    code = r"""
        local t = mix.php_unpack("Nlen/a*body", "\0\0\0\5hello")
        local c = mix.php_unpack("C*", "\1\2\3")
        return t.len, t.body, #c, c[1], c[3]
    """
    assert lua(engine, code) == (5, b"hello", 3, 1, 3)


def test_php_unpack_offset(engine: Engine) -> None:
    [table, err] = lua(engine, "return mix.php_unpack('C', '\\1\\2', 1)")
    assert err is None and py(table) == {1: 2}
    assert lua(engine, "return mix.php_unpack('C', '\\1\\2', 3)") == (None, b"offset out of range")
    assert lua(engine, "return mix.php_unpack('C', '\\1\\2', 0/0)") == (None, b"offset out of range")


@pytest.mark.parametrize("fmt, data, err", [
    ("N", b"\x00\x00", b"Type N: not enough input, need 4, have 2"),
    ("a5", b"abc", b"Type a: not enough input, need 5, have 3"),
    ("C3", b"\x01\x02", b"Type C: not enough input, need 1, have 0"),
    ("Y", b"", b"Invalid format type Y"),
])
def test_php_unpack_errors_return_nil_err(engine: Engine, fmt: str, data: bytes, err: bytes) -> None:
    assert lua(engine, f"return mix.php_unpack({lit(fmt)}, {lit(data)})") == (None, err)


def test_php_pack_unpack_round_trip(engine: Engine) -> None:
    code = r"""
        local packed = mix.php_pack("nvNVa4A4Z4H4cCJGE", 0x1234, 0x5678, 0x9abcdef0, 7,
                                    "ab", "cd", "ef", "beef", -5, 250, 2^40, 0.5, -1.25)
        local t = mix.php_unpack("na/vb/Nc/Vd/a4e/A4f/Z4g/H4h/ci/Cj/Jk/Gl/Em", packed)
        return #packed, t.a, t.b, t.c, t.d, t.e, t.f, t.g, t.h, t.i, t.j, t.k, t.l, t.m
    """
    assert lua(engine, code) == (2 + 2 + 4 + 4 + 4 + 4 + 4 + 2 + 1 + 1 + 8 + 4 + 8,
                                 0x1234, 0x5678, 0x9ABCDEF0, 7, b"ab\x00\x00", b"cd", b"ef", b"beef",
                                 -5, 250, 2**40, 0.5, -1.25)


def test_php_unpack_wrong_argument_types_raise(engine: Engine) -> None:
    assert raises(engine, "mix.php_unpack, 'N'") == b"bad argument #2 to 'php_unpack' (string expected, got nil)"


# --- parse_url (Go net/url semantics, docs/lua-api.md "URLs") -------------------------------------


EMPTY_URL = {b"scheme": b"", b"opaque": b"", b"user": b"", b"host": b"", b"path": b"", b"raw_path": b"",
             b"force_query": False, b"raw_query": b"", b"fragment": b"", b"raw_fragment": b"", b"query": {}}


def url(**fields: Any) -> dict:
    """The expected Lua table: every field, defaults empty."""
    expected = dict(EMPTY_URL)
    expected.update({k.encode(): v for k, v in fields.items()})
    return expected


def test_parse_url_spec_example(engine: Engine) -> None:
    """The example of docs/lua-api.md, "URLs", field by field."""
    [table, err] = lua(engine, "return mix.parse_url('https://bob:pw@h.example:8443/p%20a/b?x=1&y=2&x=3#frag')")
    assert err is None
    assert py(table) == url(scheme=b"https", user=b"bob:pw", host=b"h.example:8443", path=b"/p a/b",
                            raw_path=b"/p%20a/b", raw_query=b"x=1&y=2&x=3", fragment=b"frag",
                            query={b"x": b"1", b"y": b"2"})


def test_parse_url_fields_from_lua(engine: Engine) -> None:
    code = """
        local u = mix.parse_url("https://bob:pw@h.example:8443/p%20a/b?x=1&y=2&x=3#frag")
        return u.scheme, u.host, u.path, u.query.x, u.query.y, u.force_query
    """
    assert lua(engine, code) == (b"https", b"h.example:8443", b"/p a/b", b"1", b"2", False)


@pytest.mark.parametrize("alias", ["url_parse", "parse_str"])
def test_parse_url_aliases(engine: Engine, alias: str) -> None:
    [table, err] = lua(engine, f"return mix.{alias}('/chat?foo=bar')")
    assert err is None and py(table) == url(path=b"/chat", raw_query=b"foo=bar", query={b"foo": b"bar"})


@pytest.mark.parametrize("text, expected", [
    # a relative reference, as server.RequestUri
    ("/chat?foo=bar", url(path=b"/chat", raw_query=b"foo=bar", query={b"foo": b"bar"})),
    # no query
    ("http://example.com/a/b", url(scheme=b"http", host=b"example.com", path=b"/a/b")),
    # force_query: ends with "?" and no query
    ("http://example.com/x?", url(scheme=b"http", host=b"example.com", path=b"/x", force_query=True)),
    # IPv6 host with port, and with a zone
    ("ws://[::1]:6790/chat", url(scheme=b"ws", host=b"[::1]:6790", path=b"/chat")),
    ("http://[fe80::1%25en0]:8080/", url(scheme=b"http", host=b"[fe80::1%en0]:8080", path=b"/")),
    # userinfo without a password
    ("ftp://bob@files.example/", url(scheme=b"ftp", user=b"bob", host=b"files.example", path=b"/")),
    # fragments: decoded; raw_fragment only when Go's escaping differs
    ("http://h/#a%20b", url(scheme=b"http", host=b"h", path=b"/", fragment=b"a b")),
    ("http://h/#a%2Fb", url(scheme=b"http", host=b"h", path=b"/", fragment=b"a/b", raw_fragment=b"a%2Fb")),
    # query decoding: "+" is a space, first value wins, bad pairs are skipped
    ("/s?q=a+b%21&q=2&bad=%zz&k", url(path=b"/s", raw_query=b"q=a+b%21&q=2&bad=%zz&k",
                                     query={b"q": b"a b!", b"k": b""})),
    # scheme is lower-cased; an uppercase escape in the path
    ("HTTP://h/a%2Fb", url(scheme=b"http", host=b"h", path=b"/a/b", raw_path=b"/a%2Fb")),
    # opaque (rootless) and scheme-relative
    ("mailto:bob@example.com", url(scheme=b"mailto", opaque=b"bob@example.com")),
    ("//cdn.example/x.js", url(host=b"cdn.example", path=b"/x.js")),
    ("", url()),
])
def test_parse_url_cases(engine: Engine, text: str, expected: dict) -> None:
    [table, err] = lua(engine, f"return mix.parse_url({lit(text)})")
    assert err is None and py(table) == expected


@pytest.mark.parametrize("text, err", [
    (":foo", b'parse ":foo": missing protocol scheme'),
    ("http://h:8x/", b'parse "http://h:8x/": invalid port ":8x" after host'),
    ("http://h/%zz", b'parse "http://h/%zz": invalid URL escape "%zz"'),
    ("http://[::1/", b"parse \"http://[::1/\": missing ']' in host"),
    ("a:b", None),  # a valid opaque URL
    ("1a:b/c", b'parse "1a:b/c": first path segment in URL cannot contain colon'),
    ("http://h/\x01", b'parse "http://h/\\x01": net/url: invalid control character in URL'),
    ("http://a b/", b'parse "http://a b/": invalid character " " in host name'),
    ("http://x/#%zz", b'parse "http://x/#%zz": invalid URL escape "%zz"'),
])
def test_parse_url_errors_return_nil_err(engine: Engine, text: str, err: bytes | None) -> None:
    table, got = lua(engine, f"return mix.parse_url({lit(text)})")
    if err is None:
        assert got is None and py(table)[b"opaque"] == b"b"
    else:
        assert table is None and got == err


def test_parse_url_wrong_argument_type_raises(engine: Engine) -> None:
    assert raises(engine, "mix.parse_url, {}") == b"bad argument #1 to 'parse_url' (string expected, got table)"
    assert raises(engine, "mix.parse_url") == b"bad argument #1 to 'parse_url' (string expected, got nil)"
