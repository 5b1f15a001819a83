"""``mix.http.request`` (docs/lua-api.md, "HTTP client") against a local ``twisted.web`` server on
port 0.

The script runs in a real ``Script`` (``make_engine``); the HTTP client uses the real reactor, so
these tests run under pytest-twisted.  The server echoes what it received as JSON, redirects,
answers with large bodies, or holds a request until the test lets it go.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connmix_tx.lua.http import MAX_BODY, HttpClient, parse_timeout
from connmix_tx.testing import free_port
from luahelpers import Engine, make_engine


class Echo(Resource):
    """Answers with a JSON description of the request; sets repeated headers and cookies."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.responseHeaders.addRawHeader(b"X-Multi", b"one")
        request.responseHeaders.addRawHeader(b"X-Multi", b"two")
        request.addCookie(b"sid", b"abc", path=b"/")
        request.addCookie(b"theme", b'"dark"', httpOnly=True)
        headers = {k.decode().lower(): b", ".join(v).decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": headers,
            "body": request.content.read().decode(),
        }).encode()


class Status(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(int(request.postpath[0]))
        return b"teapot"


class Redirect(Resource):
    """``/redirect/N`` redirects to ``/redirect/N-1``; ``/redirect/0`` to ``/echo``."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        n = int(request.postpath[0])
        request.setResponseCode(302)
        request.setHeader(b"location", b"/echo" if n == 0 else b"/redirect/%d" % (n - 1))
        return b""


class Big(Resource):
    """``/big/N``: N bytes."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"x" * int(request.postpath[0])


class Hold(Resource):
    """Keeps every request until the test answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []
        self.arrived: list[Deferred] = []

    def render(self, request: Request) -> Any:
        self.held.append(request)
        for waiter in self.arrived:
            waiter.callback(request)
        self.arrived.clear()
        return NOT_DONE_YET

    def next(self) -> Deferred:
        d: Deferred = Deferred()
        self.arrived.append(d)
        return d


class Server:
    def __init__(self, port: Any, hold: Hold) -> None:
        self.port = port
        self.hold = hold

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[Server]:
    from twisted.internet import reactor

    root = Resource()
    hold = Hold()
    for name, child in ((b"echo", Echo()), (b"status", Status()), (b"redirect", Redirect()),
                        (b"big", Big()), (b"hold", hold)):
        root.putChild(name, child)
    port = await endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))
    yield Server(port, hold)
    for request in hold.held:
        if not request.finished and not request._disconnected:
            request.finish()
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    from twisted.internet import reactor

    made = make_engine(tmp_path)
    made.library.http = HttpClient(reactor)
    yield made
    await made.library.http.close()


def run(engine: Engine, code: str, conn: Any = None) -> Deferred:
    """Run ``code`` in on_message; the Deferred fires with its results or fails with its error."""
    finished: Deferred = Deferred()

    def done(ok: bool, value: Any) -> None:
        if ok:
            finished.callback(value)
        else:
            finished.errback(AssertionError(value))

    engine.script.run_message(conn.cid if conn else b"", b"text", code.encode(), done)
    return finished


async def lua(engine: Engine, code: str) -> tuple:
    return await run(engine, code)


# --- responses ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_response_fields(engine: Engine, server: Server) -> None:
    code = f"""
        local r, err = mix.http.request("get", "{server.url('/echo')}")
        return r.status_code, r.body, r.body_size, r.headers["x-multi"], r.headers["content-type"],
               r.cookies.sid, r.cookies.theme, r.url, err, #r.body == r.body_size
    """
    status, body, size, multi, ctype, sid, theme, url, err, same = await lua(engine, code)
    assert status == 200 and err is None and same is True
    assert json.loads(body)["method"] == "GET" and size == len(body)
    assert multi == b"one, two" and ctype == b"application/json"
    assert sid == b"abc" and theme == b"dark"
    assert url == server.url("/echo").encode()


@pytest_twisted.ensureDeferred
async def test_header_names_are_lower_case(engine: Engine, server: Server) -> None:
    code = f"""
        local r = mix.http.request("GET", "{server.url('/echo')}")
        local names = {{}}
        for k in pairs(r.headers) do names[#names + 1] = k end
        table.sort(names)
        return table.concat(names, ",")
    """
    (names,) = await lua(engine, code)
    assert b"content-type" in names.split(b",") and names == names.lower()


@pytest_twisted.ensureDeferred
async def test_non_2xx_is_not_an_error(engine: Engine, server: Server) -> None:
    code = f"""
        local r, err = mix.http.request("GET", "{server.url('/status/418')}")
        return r.status_code, r.body, err
    """
    assert await lua(engine, code) == (418, b"teapot", None)


@pytest_twisted.ensureDeferred
async def test_post_body_and_options(engine: Engine, server: Server) -> None:
    code = f"""
        local r, err = mix.http.request("POST", "{server.url('/echo?a=1')}", {{
          query = "b=2&c=x%20y",
          headers = {{ ["X-Token"] = "t0k", ["Content-Type"] = "text/plain" }},
          cookies = {{ lang = "en", id = 7 }},
          body = "hello",
          auth = {{ username = "bob", password = "pw" }},
          timeout = "5s",
        }})
        return r.body, err
    """
    body, err = await lua(engine, code)
    assert err is None
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["body"] == "hello"
    assert seen["uri"] == "/echo?a=1&b=2&c=x%20y"
    assert seen["headers"]["x-token"] == "t0k"
    assert seen["headers"]["content-type"] == "text/plain"
    assert seen["headers"]["cookie"] == "id=7; lang=en"
    assert seen["headers"]["authorization"] == "Basic Ym9iOnB3"


@pytest_twisted.ensureDeferred
async def test_query_option_without_a_query_in_the_url(engine: Engine, server: Server) -> None:
    code = f"""return mix.http.request("GET", "{server.url('/echo')}", {{ query = "x=1" }}).body"""
    (body,) = await lua(engine, code)
    assert json.loads(body)["uri"] == "/echo?x=1"


# --- redirects ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redirects_are_followed_and_url_is_the_final_one(engine: Engine, server: Server) -> None:
    code = f"""
        local r, err = mix.http.request("GET", "{server.url('/redirect/9')}")
        return r.status_code, r.url, err
    """
    assert await lua(engine, code) == (200, server.url("/echo").encode(), None)


@pytest_twisted.ensureDeferred
async def test_more_than_ten_redirects_fail(engine: Engine, server: Server) -> None:
    code = f"""return mix.http.request("GET", "{server.url('/redirect/10')}")"""
    assert await lua(engine, code) == (None, b"stopped after 10 redirects")


# --- limits and failures --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_body_up_to_8_mib_is_read(engine: Engine, server: Server) -> None:
    code = f"""
        local r, err = mix.http.request("GET", "{server.url(f'/big/{MAX_BODY}')}")
        return r.body_size, #r.body, err
    """
    assert await lua(engine, code) == (MAX_BODY, MAX_BODY, None)


@pytest_twisted.ensureDeferred
async def test_body_over_8_mib_is_too_large(engine: Engine, server: Server) -> None:
    code = f"""return mix.http.request("GET", "{server.url(f'/big/{MAX_BODY + 1}')}")"""
    assert await lua(engine, code) == (None, b"response too large")


@pytest_twisted.ensureDeferred
async def test_timeout_when_the_server_never_answers(engine: Engine, server: Server) -> None:
    code = f"""return mix.http.request("GET", "{server.url('/hold')}", {{ timeout = "200ms" }})"""
    assert await lua(engine, code) == (None, b"timeout")
    assert engine.script.waiting == 0


@pytest_twisted.ensureDeferred
async def test_timeout_as_a_number(engine: Engine, server: Server) -> None:
    code = f"""return mix.http.request("GET", "{server.url('/hold')}", {{ timeout = 0.1 }})"""
    assert await lua(engine, code) == (None, b"timeout")


@pytest_twisted.ensureDeferred
async def test_connection_refused(engine: Engine) -> None:
    port = free_port()  # nothing listens there
    code = f"""return mix.http.request("GET", "http://127.0.0.1:{port}/")"""
    assert await lua(engine, code) == (None, b"connection refused")


@pytest_twisted.ensureDeferred
async def test_only_http_and_https(engine: Engine) -> None:
    assert await lua(engine, 'return mix.http.request("GET", "ftp://example.com/x")') == (
        None, b'unsupported protocol scheme "ftp"')
    assert await lua(engine, 'return mix.http.request("GET", "/relative")') == (
        None, b'unsupported protocol scheme ""')
    assert await lua(engine, 'return mix.http.request("GET", "http:///x")') == (
        None, b"no host in request url")
    assert await lua(engine, 'return mix.http.request("GE T", "http://h/")') == (
        None, b'invalid method "GE T"')
    value, err = await lua(engine, 'return mix.http.request("GET", "http://a..b/")')
    assert value is None and err.startswith(b'invalid url "http://a..b/"')


# --- argument errors raise -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_option_raises(engine: Engine, server: Server) -> None:
    code = f"""return pcall(mix.http.request, "GET", "{server.url('/echo')}", {{ tiemout = 5 }})"""
    ok, err = await lua(engine, code)
    assert ok is False and b"unknown option 'tiemout'" in err


@pytest.mark.parametrize("args, message", [
    ('nil, "http://h/"', b"bad argument #1 to 'request' (string expected, got nil)"),
    ('"GET", {}', b"bad argument #2 to 'request' (string expected, got table)"),
    ('"GET", "http://h/", "x"', b"bad argument #3 to 'request' (table expected, got string)"),
    ('"GET", "http://h/", {headers = "x"}', b"(headers: table expected, got string)"),
    ('"GET", "http://h/", {timeout = "soon"}', b"invalid timeout 'soon'"),
    ('"GET", "http://h/", {timeout = 0}', b"timeout must be positive"),
    ('"GET", "http://h/", {auth = {password = "p"}}', b"(auth.username: string expected, got nil)"),
])
@pytest_twisted.ensureDeferred
async def test_bad_arguments_raise_at_the_calling_line(engine: Engine, args: str, message: bytes) -> None:
    code = f"return pcall(function()\n local r, e = mix.http.request({args})\n return r, e\nend)"
    ok, err = await lua(engine, code)
    assert ok is False and message in err
    assert err.startswith(b"exec:2: "), err


def test_parse_timeout() -> None:
    assert parse_timeout(b"500ms") == 0.5
    assert parse_timeout(b"30s") == 30
    assert parse_timeout(b"5m") == 300
    assert parse_timeout(b"1h") == 3600
    assert parse_timeout(b"1m30s") == 90
    assert parse_timeout(2) == 2.0
    for bad in (b"", b"5", b"5 s", b"-1s", b"1d"):
        with pytest.raises(TypeError):
            parse_timeout(bad)


@pytest_twisted.ensureDeferred
async def test_cannot_wait_outside_an_engine_coroutine(engine: Engine, server: Server) -> None:
    code = f"""
        local co = coroutine.create(function() return mix.http.request("GET", "{server.url('/hold')}") end)
        return coroutine.resume(co)
    """
    ok, err = await lua(engine, code)
    assert ok is False and err.endswith(b"cannot wait here")
    assert server.hold.held == []  # nothing was sent


# --- coroutines: one connection waits, the others are served ---------------------------------


@pytest_twisted.ensureDeferred
async def test_other_connections_are_served_while_one_waits(engine: Engine, server: Server) -> None:
    waiting_conn, _ = engine.connect()
    other_conn, _ = engine.connect()
    arrived = server.hold.next()
    slow = run(engine, f"""return mix.http.request("GET", "{server.url('/hold')}").body""", waiting_conn)
    request = await arrived
    assert not slow.called and engine.script.waiting == 1
    quick = run(engine, "return mix.websocket():client_id()", other_conn)
    assert quick.called and (await quick) == (other_conn.cid,)
    request.write(b"finally")
    request.finish()
    assert await slow == (b"finally",)
    assert engine.script.waiting == 0
