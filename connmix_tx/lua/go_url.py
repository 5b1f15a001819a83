"""``mix.parse_url`` (also ``url_parse`` and ``parse_str``): URLs parsed as Go's ``net/url`` parses them.

The result table and the error texts follow Go's ``url.Parse`` (connmix is written in Go and
scripts written for it compare those texts); the first value of each query key is returned in
``query``.  A URL Go rejects returns ``nil, err``.
"""

from __future__ import annotations

import re
from typing import Any

from connmix_tx.lua.args import string_arg

__all__ = ["parse_url"]

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
    # raw_path is the path as written, "" when that equals the decoded path.
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
    raw = string_arg(url, 1, "parse_url")
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
