"""``mix.http.request`` (docs/lua-api.md, "HTTP client"): an HTTP/HTTPS client for Lua scripts, on
treq.

``HttpClient.request`` takes the Lua arguments as lupa hands them over (``bytes`` for strings, a
Lua table for ``options``), checks them (wrong types and unknown option names raise, as Lua's
own library does) and returns a Deferred that fires with a plain Python response dict, or fails
with ``HttpError`` whose text is the short ``err`` the script sees (``"timeout"``,
``"connection refused"``, ``"response too large"``, ...).  Nothing here touches Lua values
beyond reading the arguments: ``MixLibrary.http_request`` turns the result into a table and
suspends the calling coroutine on it.

One timer bounds the whole exchange (connecting, redirects, reading the body), so every wait
ends.  Redirects are followed browser-like (301/302/303 become GET) up to ``MAX_REDIRECTS``;
``Authorization`` and ``Cookie`` are not sent to another origin.  ``network_error`` is shared with
the Redis client: it turns a connection failure into a short lower-case reason.
"""

from __future__ import annotations

import base64
import re
from typing import Any, cast
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import error as net
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import error as web_error
from twisted.web.client import (
    Agent,
    BrowserLikeRedirectAgent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from connmix_tx.lua.convert import is_table, lua_type_name
from connmix_tx.reactors import IReactor

#: Largest response body read into Lua (docs/lua-api.md, "HTTP client").
MAX_BODY = 8 * 1024 * 1024
MAX_REDIRECTS = 10
DEFAULT_TIMEOUT = 30.0
OPTIONS = ("query", "headers", "cookies", "body", "timeout", "auth")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HttpError(Exception):
    """A failed request; ``str()`` is the ``err`` string returned to Lua."""


class _TooLarge(Exception):
    pass


# --- arguments ----------------------------------------------------------------------------------


def _bad(what: str, expected: str, value: object) -> TypeError:
    """Lua's argument error; ``what`` is an argument number or an option of argument #3."""
    if what.isdigit():
        return TypeError(f"bad argument #{what} to 'request' ({expected} expected, got {lua_type_name(value)})")
    return TypeError(f"bad argument #3 to 'request' ({what}: {expected} expected, got {lua_type_name(value)})")


def _string(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return b"%.14g" % value
    raise _bad(what, "string", value)


def _pairs(value: object, what: str) -> list[tuple[bytes, bytes]]:
    """A table of name -> string as a sorted list of pairs (deterministic header order)."""
    if not is_table(value):
        raise _bad(what, "table", value)
    pairs = []
    for key, item in value.items():
        name = _string(key, what)
        pairs.append((name, _string(item, f"{what}.{name.decode('utf-8', 'replace')}")))
    return sorted(pairs)


def parse_timeout(value: object) -> float:
    """A timeout option: seconds as a number, or a Go duration string (``"500ms"``, ``"1m30s"``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace").strip()
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise TypeError(f"bad argument #3 to 'request' (invalid timeout '{text}')")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise _bad("timeout", "number or string", value)
    if not seconds > 0 or seconds == float("inf"):
        raise TypeError("bad argument #3 to 'request' (timeout must be positive)")
    return seconds


class Request:
    """The checked arguments of one ``mix.http.request`` call."""

    def __init__(self, method: object, url: object, options: object = None) -> None:
        self.method = _string(method, "1").upper()
        self.url = _string(url, "2")
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: bytes | None = None
        self.timeout = DEFAULT_TIMEOUT
        self.auth: tuple[bytes, bytes] | None = None
        if options is None:
            return
        if not is_table(options):
            raise _bad("3", "table", options)
        given = dict(options.items())
        for name in given:
            if name is None or not isinstance(name, bytes) or name.decode("utf-8", "replace") not in OPTIONS:
                shown = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
                raise TypeError(f"bad argument #3 to 'request' (unknown option '{shown}')")
        if given.get(b"query") is not None:
            query = _string(given[b"query"], "query").lstrip(b"?")
            if query:
                base, hash_, fragment = self.url.partition(b"#")
                if b"?" not in base:
                    joiner = b"?"
                elif base.endswith((b"?", b"&")):
                    joiner = b""
                else:
                    joiner = b"&"
                self.url = base + joiner + query + hash_ + fragment
        if given.get(b"headers") is not None:
            self.headers = _pairs(given[b"headers"], "headers")
        if given.get(b"cookies") is not None:
            cookies = _pairs(given[b"cookies"], "cookies")
            if cookies:
                self.headers.append((b"Cookie", b"; ".join(k + b"=" + v for k, v in cookies)))
        if given.get(b"body") is not None:
            self.body = _string(given[b"body"], "body")
        if given.get(b"timeout") is not None:
            self.timeout = parse_timeout(given[b"timeout"])
        if given.get(b"auth") is not None:
            auth = given[b"auth"]
            if not is_table(auth):
                raise _bad("auth", "table", auth)
            self.auth = (
                _string(auth[b"username"], "auth.username"),
                _string(auth[b"password"] if auth[b"password"] is not None else b"", "auth.password"),
            )

    def check(self) -> str | None:
        """The ``err`` for a request that cannot be sent (before any network I/O), or None."""
        if not _TOKEN.fullmatch(self.method):
            return f'invalid method "{self.method.decode("utf-8", "replace")}"'
        try:
            parts = urlsplit(self.url.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return f'invalid url "{self.url.decode("utf-8", "replace")}"'
        if parts.scheme.lower() not in ("http", "https"):
            return f'unsupported protocol scheme "{parts.scheme}"'
        if not parts.hostname:
            return "no host in request url"
        try:
            _ = parts.port
        except ValueError:
            return f'invalid port in url "{self.url.decode("ascii")}"'
        for name, value in self.headers:
            if not _TOKEN.fullmatch(name) or b"\r" in value or b"\n" in value:
                return f'invalid header "{name.decode("utf-8", "replace")}"'
        return None


# --- the response ----------------------------------------------------------------------------


class _BodyReader(Protocol):
    """Reads a response body fully, up to ``limit`` bytes; ``done`` fires with the bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(Failure(_TooLarge()))
            self._abort()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def _cancel(self, deferred: Deferred) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            # deliverBody connects this protocol to the response's producer, not to a socket.
            cast(IPushProducer, self.transport).stopProducing()


def _headers(response: IResponse) -> dict[bytes, bytes]:
    merged: dict[bytes, list[bytes]] = {}
    for name, values in response.headers.getAllRawHeaders():
        merged.setdefault(name.lower(), []).extend(values)
    return {name: b", ".join(values) for name, values in merged.items()}


def _cookies(response: IResponse) -> dict[bytes, bytes]:
    """Name -> value of the final response's ``Set-Cookie`` headers (as Go's ``resp.Cookies()``)."""
    cookies = {}
    for line in response.headers.getRawHeaders(b"set-cookie", []):
        pair = line.split(b";", 1)[0]
        name, eq, value = pair.partition(b"=")
        name = name.strip()
        if eq and name:
            value = value.strip()
            if len(value) > 1 and value.startswith(b'"') and value.endswith(b'"'):
                value = value[1:-1]
            cookies[name] = value
    return cookies


def network_error(failure: Failure) -> str:
    """A short lower-case reason for a failed connection or exchange."""
    if failure.check(ResponseFailed, ResponseNeverReceived):
        reasons = getattr(failure.value, "reasons", None) or []
        for reason in reasons:
            if not reason.check(net.ConnectionDone, net.ConnectionLost):
                return network_error(reason)
        return "connection closed before the response" if failure.check(ResponseNeverReceived) \
            else "connection lost"
    if failure.check(net.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net.TimeoutError, CancelledError):
        return "timeout"
    if failure.check(net.DNSLookupError):
        return "no such host"
    if failure.check(net.NoRouteError):
        return "no route to host"
    if failure.check(net.ConnectionDone):
        return "connection closed"
    if failure.check(net.ConnectionLost, net.ConnectionAborted):
        return "connection lost"
    if failure.check(web_error.InfiniteRedirection):
        return f"stopped after {MAX_REDIRECTS} redirects"
    if failure.check(web_error.RedirectWithNoLocation):
        return "redirect without location"
    kind = failure.type.__name__ if failure.type is not None else ""
    text = failure.getErrorMessage().strip() or kind
    if "SSL" in kind or "ssl" in text.lower() or "certificate" in text.lower():
        return f"tls: {text}"
    return text


# --- the client -------------------------------------------------------------------------------


class HttpClient:
    """The HTTP client of one engine: a connection pool shared by every script."""

    def __init__(self, reactor: IReactor, max_body: int = MAX_BODY) -> None:
        self.reactor = reactor
        self.max_body = max_body
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 8
        self.pool.cachedConnectionTimeout = 60

    def request(self, method: object, url: object, options: object = None) -> Deferred:
        """Send one request; the Deferred fires with a response dict or fails with HttpError.

        Raises TypeError for wrong arguments (types, unknown options).
        """
        request = Request(method, url, options)
        problem = request.check()
        if problem is not None:
            d: Deferred = Deferred()
            d.errback(HttpError(problem))
            return d
        return self._send(request)

    def _send(self, request: Request) -> Deferred:
        agent = BrowserLikeRedirectAgent(
            Agent(self.reactor, pool=self.pool, connectTimeout=request.timeout),
            redirectLimit=MAX_REDIRECTS,
        )
        client = HTTPClient(agent)
        headers: dict[bytes, list[bytes]] = {}
        for name, value in request.headers:
            headers.setdefault(name, []).append(value)
        if request.auth is not None:
            token = base64.b64encode(request.auth[0] + b":" + request.auth[1])
            headers[b"Authorization"] = [b"Basic " + token]
        timed_out = []
        try:
            sending = client.request(
                request.method.decode("ascii"), request.url, headers=Headers(headers), data=request.body,
                # treq types its reactor as its private _ITreqReactor (TCP, time and name
                # resolution), which IReactor extends but does not name.
                allow_redirects=False, unbuffered=True, reactor=self.reactor,  # type: ignore[arg-type]
            )
        except (ValueError, UnicodeError) as e:  # hyperlink / idna refuse the URL
            sending = Deferred()
            sending.errback(HttpError(f'invalid url "{request.url.decode("ascii")}": {e}'))
        sending.addErrback(_redirect_not_followed)
        sending.addCallback(self._read)

        def expire() -> None:
            timed_out.append(True)
            sending.cancel()

        timer = self.reactor.callLater(request.timeout, expire)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                if timed_out:
                    raise HttpError("timeout")
                if result.check(_TooLarge):
                    raise HttpError("response too large")
                if result.check(HttpError):
                    return result
                raise HttpError(network_error(result))
            return result

        return sending.addBoth(finished)

    def _read(self, response: IResponse) -> Deferred:
        original = getattr(response, "original", response)
        reader = _BodyReader(self.max_body)
        original.deliverBody(reader)

        def respond(body: bytes) -> dict[str, Any]:
            return {
                "status_code": original.code,
                "body": body,
                "body_size": len(body),
                "headers": _headers(original),
                "cookies": _cookies(original),
                "url": original.request.absoluteURI,
            }

        return reader.done.addCallback(respond)

    def close(self) -> Deferred:
        """Close the cached keep-alive connections (engine stop)."""
        return self.pool.closeCachedConnections()


def _redirect_not_followed(failure: Failure) -> Any:
    """A 307/308 answer to a method that must not be redirected is the response itself."""
    failure.trap(ResponseFailed)
    error = failure.value
    response = getattr(error, "response", None)
    if response is not None and isinstance(error, ResponseFailed) \
            and any(r.check(web_error.PageRedirect) for r in error.reasons):
        return response
    return failure
