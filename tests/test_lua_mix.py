"""Tests for the ``mix`` library and the connection object (docs/lua-api.md).

The script runs against real engine objects (``ConnectionRegistry``, ``QueueManager`` on a
``Clock``, ``Router`` of node 0 with ``LocalOps``); connections carry a recording fake transport.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connmix_tx.engine.connections import ClientConnection
from connmix_tx.testing import Outcome, client_ids
from luahelpers import EXEC_ENTRY, Engine, make_engine


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    """A websocket script whose on_message runs the message text as Lua."""
    return make_engine(tmp_path, options={"path": "/chat"})


@pytest.fixture
def conn(engine: Engine) -> ClientConnection:
    return engine.connect()[0]


def lua(engine: Engine, code: str, conn: ClientConnection | None = None) -> tuple:
    """Run ``code`` inside on_message of ``conn`` (or of no connection) and return its results."""
    return engine.message(conn, code).values


def queued(engine: Engine, topic: str) -> list[tuple[str, object]]:
    """The messages waiting in ``topic``: (client_id, decoded JSON data)."""
    return [(cid, json.loads(data)) for cid, data in engine.queues.topics[topic].messages]


# --- JSON -----------------------------------------------------------------------------------


def test_json_encode(engine: Engine) -> None:
    code = "return mix.json_encode({b = {}, a = {1, 2.0, 'x'}, c = {k = true}})"
    assert lua(engine, code) == (b'{"a":[1,2,"x"],"b":[],"c":{"k":true}}', None)
    assert lua(engine, "return mix.json_encode('caf\\195\\169 <&>')") == ('"café <&>"'.encode(), None)
    value, err = lua(engine, "return mix.json_encode({f = print})")
    assert value is None and b"function" in err


def test_json_decode(engine: Engine) -> None:
    code = """
        local t = mix.json_decode('{"a":[1,null,3],"b":null,"c":{"d":"e"},"n":1.5}')
        return t.a[1], t.a[2], t.a[3], t.b, t.c.d, t.n
    """
    assert lua(engine, code) == (1, None, 3, None, b"e", 1.5)
    value, err = lua(engine, "return mix.json_decode('{\"a\":')")
    assert value is None and err.startswith(b"invalid json: ")
    assert lua(engine, "return pcall(mix.json_decode, 5)")[0] is False


@pytest.mark.parametrize("text, acceptable", [
    ("12345678901234567890", [12345678901234567890.0]),  # precision is lost, no error
    ('"\\ud800"', ["\ufffd".encode(), None]),  # a lone surrogate: U+FFFD as Go, or nil, err
])
def test_json_decode_never_raises_for_json_text(engine: Engine, text: str, acceptable: list) -> None:
    ok, value = lua(engine, f"return pcall(mix.json_decode, {text!r})")[:2]
    assert ok is True and value in acceptable


# --- base64 (RFC 4648 section 10) -------------------------------------------------------------


RFC4648 = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="),
           ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]


@pytest.mark.parametrize("plain, encoded", RFC4648)
def test_base64_vectors(engine: Engine, plain: str, encoded: str) -> None:
    assert lua(engine, f"return mix.base64_encode({plain!r})") == (encoded.encode(),)
    assert lua(engine, f"return mix.base64_decode({encoded!r})") == (plain.encode(), None)
    unpadded = encoded.rstrip("=")
    assert lua(engine, f"return mix.base64_decode({unpadded!r})") == (plain.encode(), None)


def test_base64_is_binary_safe(engine: Engine) -> None:
    round_trip = "return mix.base64_decode(mix.base64_encode('\\0\\255\\254'))"
    assert lua(engine, round_trip) == (b"\0\xff\xfe", None)
    value, err = lua(engine, "return mix.base64_decode('Zm9v!!')")
    assert value is None and err


# --- queue ----------------------------------------------------------------------------------


def test_queue_push_counts_and_serialises(engine: Engine, conn: ClientConnection) -> None:
    code = "local q = mix.queue return q.push('foo', {msg = 'hi'}), q.push('foo', 'text'), q.push('foo', 3)"
    assert lua(engine, code, conn) == (1, 2, 3, None)
    assert lua(engine, "return mix.queue.push('foo', true)", conn) == (4, None)
    cid = str(conn.client_id)
    assert queued(engine, "foo") == [(cid, {"msg": "hi"}), (cid, "text"), (cid, 3), (cid, True)]


def test_queue_push_outside_a_connection_records_empty_client_id(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "mix.queue.push('boot', {1})\n" + EXEC_ENTRY)
    lua(engine, "mix.queue.push('boot', 'again')")
    assert queued(engine, "boot") == [("", [1]), ("", "again")]


def test_queue_push_refusals(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, topic_size=1, max_topics=2)
    assert lua(engine, "return mix.queue.push('a', 1)") == (1, None)
    assert lua(engine, "return mix.queue.push('a', 2)") == (None, b"queue full")
    assert lua(engine, "return mix.queue.push('has space', 1)") == (None, b"invalid topic")
    assert lua(engine, "return mix.queue.push('', 1)") == (None, b"invalid topic")
    assert lua(engine, "return mix.queue.push(nil, 1)") == (None, b"invalid topic")
    value, err = lua(engine, "return mix.queue.push('b', {f = print})")
    assert value is None and err.startswith(b"json: ")
    assert lua(engine, "return mix.queue.push('b', 1)") == (1, None)
    assert lua(engine, "return mix.queue.push('c', 1)") == (None, b"too many topics")
    assert engine.queues.length("a") == 1


# --- mesh ----------------------------------------------------------------------------------


def test_mesh_send_to_a_local_connection(engine: Engine) -> None:
    target, transport = engine.connect()
    cid = target.cid.decode()
    assert lua(engine, f"return mix.mesh.send('{cid}', 'hello')") == (None,)
    assert lua(engine, f"return mix.mesh.send({cid}, 'raw', 'binary')") == (None,)  # a number works
    assert lua(engine, f"return mix.mesh.send('{cid}', 'again', 'text')") == (None,)
    assert transport.delivered == [(b"hello", False), (b"raw", True), (b"again", False)]
    assert lua(engine, f"return mix.mesh.send('{cid}', 'x', 'json')") == (b"invalid type",)


def test_mesh_send_failures(engine: Engine) -> None:
    handshaking, _ = engine.connect(ready=False)
    slow, _ = engine.connect(error="slow consumer")
    cases = {
        str(client_ids(0)() + 999): b"client not found",
        handshaking.cid.decode(): b"client not found",
        str(client_ids(5)()): b"node unavailable",
        "not-a-number": b"invalid client id",
        slow.cid.decode(): b"slow consumer",
    }
    for target, error in cases.items():
        assert lua(engine, f"return mix.mesh.send('{target}', 'x')") == (error,), target
    assert engine.script.waiting == 0


def test_mesh_publish_counts(engine: Engine) -> None:
    (a, ta), (b, tb), (_, tc) = engine.connect(), engine.connect(error="closed"), engine.connect()
    engine.connections.subscribe(a, ["news"])
    engine.connections.subscribe(b, ["news"])
    assert lua(engine, "return mix.mesh.publish('news', 'extra', 'binary')") == (1, 1)
    assert ta.delivered == [(b"extra", True)] and tc.delivered == []
    assert lua(engine, "return mix.mesh.publish('nobody', 'x')") == (0, 0)
    assert lua(engine, "return pcall(mix.mesh.publish, 'news', 'x', 'json')")[0] is False


# --- connection lookup and options --------------------------------------------------------------


def test_websocket_needs_a_current_connection(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "top = {mix.websocket()}\n" + EXEC_ENTRY)
    assert lua(engine, "return top[1], top[2]") == (None, b"no current connection")
    assert lua(engine, "return mix.socket.tcp()") == (None, b"not a socket server")


def test_socket_tcp_on_a_websocket_server_only(tmp_path: Path) -> None:
    source = "function protocol_input() end\nfunction protocol_decode() end\n" \
             "function protocol_encode() end\non_connect = function() end\n" + EXEC_ENTRY
    engine = make_engine(tmp_path, source, kind="socket")
    conn, _ = engine.connect()
    assert lua(engine, "return mix.websocket()", conn) == (None, b"not a websocket server")
    assert lua(engine, "return mix.socket.tcp():client_id()", conn) == (conn.cid,)


def test_server_option(engine: Engine) -> None:
    assert lua(engine, "return mix.server.option('path'), mix.server.option('nope')") == (b"/chat", None)


# --- the connection object ---------------------------------------------------------------------


def test_client_id_and_remote_addr(engine: Engine, conn: ClientConnection) -> None:
    code = "local ws = mix.websocket() return ws:client_id(), ws:remote_addr()"
    assert lua(engine, code, conn) == (str(conn.client_id).encode(), b"127.0.0.1:50000")


def test_context_is_a_deep_copy(engine: Engine, conn: ClientConnection) -> None:
    code = """
        local ws = mix.websocket()
        local empty = next(ws:context()) == nil
        ws:set_context_value('a', {x = 1})
        local t = ws:context()
        t.a.x, t.b = 2, 3
        return empty, ws:context().a.x, ws:context().b
    """
    assert lua(engine, code, conn) == (True, 1, None)
    assert conn.context == {"a": {"x": 1}}


def test_set_context_merges(engine: Engine, conn: ClientConnection) -> None:
    conn.context.update(keep=1, a=1)
    lua(engine, "mix.websocket():set_context({a = 2, b = {3}}) mix.websocket():set_context({})", conn)
    assert conn.context == {"keep": 1, "a": 2, "b": [3]}
    assert lua(engine, "return pcall(mix.websocket().set_context, mix.websocket(), 'x')", conn)[0] is False


def test_set_context_value_and_context_value(engine: Engine, conn: ClientConnection) -> None:
    code = """
        local ws = mix.websocket()
        ws:set_context_value('gone', 1)
        ws:set_context_value('gone', nil)
        ws:set_context_value(7, 'seven')
        return ws:context_value('7'), ws:context_value(7), ws:context_value('gone')
    """
    assert lua(engine, code, conn) == (b"seven", b"seven", None)
    assert conn.context == {"7": "seven"}


def test_subscribe_and_unsubscribe(engine: Engine, conn: ClientConnection) -> None:
    assert lua(engine, "return mix.websocket():subscribe('a', 'b', 'a')", conn) == (None,)
    assert set(engine.connections.channels) == {"a", "b"} and conn.channels == {"a", "b"}
    err, = lua(engine, "return mix.websocket():subscribe('c', 'bad name')", conn)
    assert err and conn.channels == {"a", "b"}  # nothing from the failed call applied
    lua(engine, "mix.websocket():unsubscribe('a', 'never')", conn)
    assert set(engine.connections.channels) == {"b"}


def test_subscribe_limit(engine: Engine, conn: ClientConnection) -> None:
    code = "local ws = mix.websocket() for i = 1, 127 do assert(ws:subscribe('ch' .. i) == nil) end"
    lua(engine, code, conn)
    assert lua(engine, "return mix.websocket():subscribe('x', 'y')", conn)[0]
    assert lua(engine, "return mix.websocket():subscribe('x')", conn) == (None,)
    assert lua(engine, "return mix.websocket():subscribe('y')", conn)[0]
    assert len(conn.channels) == 128


def test_send(engine: Engine) -> None:
    conn, transport = engine.connect()
    code = "local ws = mix.websocket() return ws:send('t'), ws:send('b', 'binary'), ws:send(42, 'text')"
    assert lua(engine, code, conn) == (None, None, None)
    assert transport.sent == [(b"t", False), (b"b", True), (b"42", False)]
    assert lua(engine, "return mix.websocket():send('x', 'json')", conn) == (b"invalid type",)
    transport.error = "invalid utf-8"
    assert lua(engine, "return mix.websocket():send('\\255')", conn) == (b"invalid utf-8",)


def test_connection_methods_after_close(engine: Engine) -> None:
    conn, transport = engine.connect()
    lua(engine, "saved = mix.websocket() saved:close()", conn)
    assert transport.closes == 1
    conn.mark_closed()
    code = "saved:close() return saved:client_id(), saved:send('late'), saved:subscribe('ch')"
    assert lua(engine, code) == (conn.cid, b"closed", b"closed")  # used later, outside its callback
    assert transport.closes == 1 and transport.sent == [] and conn.channels == set()


def test_clear_buffer_error_raises(engine: Engine) -> None:
    conn, transport = engine.connect()
    transport.clear_buffer = lambda: "clear_buffer is for socket servers"  # type: ignore[method-assign]
    ok, err = lua(engine, "return pcall(mix.websocket().clear_buffer, mix.websocket())", conn)
    assert ok is False and "socket servers" in str(err)


# --- wait_context_value ----------------------------------------------------------------------

WAIT = "return mix.websocket():wait_context_value('user'{timeout})"


def wait(engine: Engine, conn: ClientConnection, timeout: str = "") -> Outcome:
    return engine.message(conn, WAIT.format(timeout=f", {timeout}" if timeout else ""))


def test_wait_context_value_immediate(engine: Engine, conn: ClientConnection) -> None:
    conn.set_context_value("user", "bob")
    assert wait(engine, conn).values == (b"bob",)
    assert engine.script.waiting == 0


def test_wait_context_value_until_set_from_python(engine: Engine, conn: ClientConnection) -> None:
    outcome = wait(engine, conn)
    assert not outcome.finished and engine.script.waiting == 1
    conn.set_context_value("other", 1)
    assert not outcome.finished
    conn.set_context({"user": {"name": "bob", "tags": ["a"]}})  # as the API's conn.call would
    (value,) = outcome.values
    assert value[b"name"] == b"bob" and value[b"tags"][1] == b"a"
    assert conn.waiting == 0 and engine.script.waiting == 0


def test_wait_context_value_timeout(engine: Engine, conn: ClientConnection) -> None:
    outcome = wait(engine, conn, "5")
    engine.clock.advance(4.9)
    assert not outcome.finished
    engine.clock.advance(0.2)
    assert outcome.values == (None, b"timeout")
    assert conn.waiting == 0 and engine.script.waiting == 0
    assert "number expected" in wait(engine, conn, "'soon'").error


def test_wait_context_value_set_before_the_timeout(engine: Engine, conn: ClientConnection) -> None:
    outcome = wait(engine, conn, "5")
    engine.clock.advance(1)
    conn.set_context_value("user", "bob")
    assert outcome.values == (b"bob",)
    engine.clock.advance(10)
    assert engine.clock.getDelayedCalls() == [] and len(outcome.calls) == 1


def test_wait_context_value_connection_closed(engine: Engine, conn: ClientConnection) -> None:
    outcome = wait(engine, conn, "5")
    conn.mark_closed()
    assert outcome.values == (None, b"closed")
    assert engine.clock.getDelayedCalls() == []
    assert wait(engine, conn).values == (None, b"closed")  # already closed: at once
