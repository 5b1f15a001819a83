"""Tests for the ``protocol: socket`` server (docs/lua-api.md, "socket servers").

Unit tests drive ``SocketServerProtocol`` with ``StringTransport`` and a ``Clock``: the test script
records what it runs by pushing ``<text>`` to the queue topic ``log``.  The shipped codecs
(``lua/protocols/``) are tested through the same server.  The integration tests start the real
service tree with a socket server and talk to it with asyncio streams and the ``websockets``
client library.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest
import websockets
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import LogLevel

from conftest import REPO, in_asyncio, loopback_config, start_engine
from connmix_tx.engine.connections import ENCODE_FAILED
from connmix_tx.testing import LogCapture
from netclients import api_call, next_event, until
from socketservers import (
    HANDSHAKE, Server, build_server, client_frame, codec_server, lost, module_function, open_websocket,
    server_frames,
)

# A newline codec with commands that exercise every branch of the input loop.
ENTRY = r"""
local function record(text) mix.queue.push('log', text) end

function on_connect(client_id)
  record('connect')
  if mix.server.option('connect') == 'wait' then
    mix.socket.tcp():wait_context_value('go')
  elseif mix.server.option('connect') == 'error' then
    error('connect failed')
  end
  record('connected')
end

local RESULTS = { FLOAT = 2.5, STRING = 'x', HUGE = 1000, NEG = -2, NIL = nil, TRUE = true }

function protocol_input(buf)
  local s = buf:tostring()
  local word = s:match('^(%u+)')
  if word == 'REJECT' then return -1 end
  if word == 'ERROR' then error('input failed') end
  if word == 'CLEAR' then mix.socket.tcp():clear_buffer() return 0 end
  if word == 'CLEARREJECT' then mix.socket.tcp():clear_buffer() return -1 end
  if word and RESULTS[word] ~= nil or word == 'NIL' then return RESULTS[word] end
  if word == 'WAIT' then return mix.socket.tcp():wait_context_value('x') end
  local i = s:find('\n', 1, true)
  return i or 0
end

function protocol_decode(packet)
  local line = packet:sub(1, -2)
  if line == 'nil' then return nil end
  if line == 'derror' then error('decode failed') end
  if line == 'close' then mix.socket.tcp():send('bye\n') mix.socket.tcp():close() return nil end
  if line == 'table' then return { kind = 'table' } end
  return line
end

function protocol_encode(data, type)
  if data == 'fail' then return nil end
  if data == 'empty' then return '' end
  if data == 'boom' then error('encode failed') end
  return '<' .. data .. '>' .. type .. '\n'
end

function on_message(v)
  local conn = mix.socket.tcp()
  if type(v) == 'table' then record('table ' .. v.kind) return end
  record('msg ' .. v)
  if v == 'raw' then conn:send('RAW') end
  if v == 'clear' then conn:clear_buffer() end
  if v == 'wait' then conn:wait_context_value('go') end
  if v == 'self' then mix.mesh.send(conn:client_id(), 'to me') end
end

function on_close(client_id, err)
  record('close ' .. tostring(err))
end
"""

# Length-prefixed packets read with buf:read and returned as buf:position() (docs/lua-api.md).
PREFIXED = r"""
function on_connect(client_id) end
function protocol_input(buf)
  local size = buf:read(1)
  if size == nil then return 0 end
  local body, err = buf:read(size:byte() - 48)
  if body == nil then return 0 end
  return buf:position()
end
function protocol_decode(packet) return packet:sub(2) end
function protocol_encode(data, type) return data end
function on_message(v) mix.queue.push('log', v) end
function on_close(client_id, err) end
"""


def make_server(
    tmp_path: Path, source: str = ENTRY, options: dict[str, str] | None = None, **config: Any
) -> Server:
    return build_server(tmp_path, source, options, **config)


@pytest.fixture
def server(tmp_path: Path) -> Server:
    return make_server(tmp_path)


@pytest.fixture
def events() -> Iterator[LogCapture]:
    with LogCapture() as logs:
        yield logs


# Input loop ---------------------------------------------------------------------------------


def test_packets_split_across_reads(server: Server) -> None:
    proto, _ = server.connect()
    for chunk in (b"he", b"llo", b"\nwo", b"rld", b"\n"):
        proto.dataReceived(chunk)
    assert server.log() == ["connect", "connected", "msg hello", "msg world"]


def test_coalesced_packets_in_one_read(server: Server) -> None:
    proto, _ = server.connect()
    proto.dataReceived(b"a\nb\nc\npartial")
    assert server.log()[2:] == ["msg a", "msg b", "msg c"]
    proto.dataReceived(b"\n")
    assert server.log()[-1] == "msg partial"


def test_buffer_read_and_position_frame_packets(tmp_path: Path) -> None:
    server = make_server(tmp_path, PREFIXED)
    proto, _ = server.connect()
    proto.dataReceived(b"3abc2de5fgh")
    assert server.log() == ["abc", "de"]
    proto.dataReceived(b"ij1k0")
    assert server.log() == ["abc", "de", "fghij", "k", ""]


def test_buffer_object_methods(server: Server) -> None:
    proto, _ = server.connect()
    script = server.engine.script
    script.runtime.execute(
        b"""
        local env = ...
        env.probe = function(buf)
          local r1, e1 = buf:read(3)
          local p1 = buf:position()
          local r2, e2 = buf:read(100)
          return buf:length(), r1, e1, p1, r2, e2, buf:position(), buf:read(0), buf:read(-2),
                 buf:read(1.7), buf:tostring(), tostring(buf), (pcall(buf.read, buf, 'x')),
                 getmetatable(buf)
        end
        """,
        script._generation.env,  # type: ignore[union-attr]
    )
    buf = server.factory.new_buffer(script.table([b"hello world"]), 6)
    assert script.call_protocol("probe", proto.conn.cid, buf) == (
        5, b"wor", None, 3, None, b"short", 3, b"", b"", b"l", b"world", b"world", False, False
    )


def test_protocol_input_gets_a_copy_of_the_whole_unconsumed_input(tmp_path: Path) -> None:
    source = ENTRY.replace("local i = s:find", "mix.queue.push('log', 'input ' .. s)\n  local i = s:find")
    server = make_server(tmp_path, source)
    proto, _ = server.connect()
    proto.dataReceived(b"a\nbb\nc")
    assert [x for x in server.log() if x.startswith("input")] == ["input a\nbb\nc", "input bb\nc", "input c"]


def test_minus_one_closes_with_input_rejected(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"ok\nREJECT\nnever\n")
    assert transport.disconnecting
    proto.dataReceived(b"late\n")  # ignored: the connection is closing
    lost(proto)
    assert server.log()[2:] == ["msg ok", "close protocol error: input rejected"]


@pytest.mark.parametrize(
    "word, err",
    [
        ("FLOAT", "protocol error: invalid protocol_input result 2.5"),
        ("STRING", "protocol error: invalid protocol_input result 'x'"),
        ("HUGE", "protocol error: invalid protocol_input result 1000"),
        ("NEG", "protocol error: invalid protocol_input result -2"),
        ("NIL", "protocol error: invalid protocol_input result nil"),
        ("TRUE", "protocol error: invalid protocol_input result True"),
        ("ERROR", "protocol error: lua error"),
        ("WAIT", "protocol error: lua error"),
    ],
)
def test_bad_protocol_input_results_close(server: Server, events: LogCapture, word: str, err: str) -> None:
    proto, transport = server.connect()
    proto.dataReceived(word.encode() + b"\n")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == f"close {err}"
    errors = events.texts(level=LogLevel.error)
    assert len(errors) == 1
    if word == "ERROR":
        assert errors[0].startswith("lua error in protocol_input (lua/entry.lua) client ")
        line = 1 + ENTRY.splitlines().index("  if word == 'ERROR' then error('input failed') end")
        assert f"lua/entry.lua:{line}: input failed" in errors[0]
    if word == "WAIT":
        assert "cannot wait in protocol_*" in errors[0]


def test_clear_buffer_in_protocol_input_ignores_the_result(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"CLEAR and the rest\nis gone\n")
    assert not transport.disconnecting and server.log() == ["connect", "connected"]
    proto.dataReceived(b"fresh\n")
    assert server.log()[-1] == "msg fresh"


def test_clear_buffer_with_minus_one_closes(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"CLEARREJECT\n")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close protocol error: input rejected"


def test_clear_buffer_outside_protocol_input_discards_at_once(server: Server) -> None:
    proto, _ = server.connect()
    proto.dataReceived(b"clear\nnext\nunfinished")
    assert server.log()[2:] == ["msg clear"]
    proto.dataReceived(b"again\n")
    assert server.log()[-1] == "msg again"


def test_unframed_input_beyond_max_message_size_closes(tmp_path: Path) -> None:
    server = make_server(tmp_path, max_message_size=16)
    proto, transport = server.connect()
    proto.dataReceived(b"x" * 16)
    assert not transport.disconnecting
    proto.dataReceived(b"y")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close message too large"


def test_framed_input_may_exceed_max_message_size_in_one_read(tmp_path: Path) -> None:
    server = make_server(tmp_path, max_message_size=16)
    proto, transport = server.connect()
    proto.dataReceived(b"0123456789\n" * 5)
    assert not transport.disconnecting and len(server.log()) == 7


def test_decode_nil_runs_no_on_message(server: Server) -> None:
    proto, _ = server.connect()
    proto.dataReceived(b"nil\nafter\ntable\n")
    assert server.log()[2:] == ["msg after", "table table"]


def test_decode_error_closes(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"derror\nnever\n")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[2:] == ["close protocol error: lua error"]


def test_conn_close_in_decode_flushes_and_closes_cleanly(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"close\nnever\n")
    assert transport.value() == b"bye\n" and transport.disconnecting
    lost(proto)
    assert server.log()[2:] == ["close nil"]


# Output -------------------------------------------------------------------------------------


def test_conn_send_is_raw_and_deliveries_are_encoded(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"raw\n")
    assert transport.value() == b"RAW"
    transport.clear()
    router = server.engine.router
    client_id = proto.conn.client_id
    assert router.send(client_id, b"hi", False) is None
    assert router.send(client_id, b"\x00", True) is None
    assert transport.value() == b"<hi>text\n<\x00>binary\n"


def test_mesh_send_to_itself_from_on_message(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"self\n")
    assert transport.value() == b"<to me>text\n"


@pytest.mark.parametrize("data", [b"fail", b"empty", b"boom"])
def test_encode_failure_fails_that_delivery_only(server: Server, events: LogCapture, data: bytes) -> None:
    proto, transport = server.connect()
    connections = server.engine.connections
    assert connections.subscribe(proto.conn, ["room"]) is None
    router = server.engine.router
    assert router.send(proto.conn.client_id, data, False) == ENCODE_FAILED
    assert router.publish("room", data, False) == (0, 1)
    assert router.publish("room", b"fine", False) == (1, 0)
    assert transport.value() == b"<fine>text\n" and not transport.disconnecting
    errors = events.texts(level=LogLevel.error)
    if data == b"boom":
        assert len(errors) == 2 and "lua error in protocol_encode (lua/entry.lua)" in errors[0]
    else:
        assert errors == []


def test_send_after_close_reports_closed(server: Server) -> None:
    proto, transport = server.connect()
    proto.close_connection()
    assert proto.send_message(b"x", False) == "closed"
    assert server.engine.router.send(proto.conn.client_id, b"x", False) == "closed"
    assert transport.value() == b""


# on_connect -----------------------------------------------------------------------------------


def test_on_connect_waits_while_bytes_arrive(tmp_path: Path) -> None:
    server = make_server(tmp_path, options={"connect": "wait"})
    proto, transport = server.connect()
    proto.dataReceived(b"one\ntw")
    proto.dataReceived(b"o\n")
    assert server.log() == ["connect"]
    # Not live yet: deliveries do not find it.
    assert server.engine.router.send(proto.conn.client_id, b"x", False) == "client not found"
    proto.conn.set_context_value("go", 1)
    assert server.log() == ["connect", "connected", "msg one", "msg two"]
    assert server.engine.router.send(proto.conn.client_id, b"x", False) is None


def test_on_connect_waiting_pauses_reading_beyond_max_message_size(tmp_path: Path) -> None:
    server = make_server(tmp_path, options={"connect": "wait"}, max_message_size=16)
    proto, transport = server.connect()
    proto.dataReceived(b"0123456789\n0123456789\n")
    assert transport.producerState == "paused" and not transport.disconnecting
    proto.conn.set_context_value("go", 1)
    assert transport.producerState == "producing"
    assert server.log()[2:] == ["msg 0123456789", "msg 0123456789"]


def test_on_connect_error_closes_and_runs_on_close(tmp_path: Path, events: LogCapture) -> None:
    server = make_server(tmp_path, options={"connect": "error"})
    proto, transport = server.connect()
    assert transport.disconnecting
    lost(proto)
    assert server.log() == ["connect", "close lua error"]
    assert any("lua error in on_connect" in t for t in events.texts(level=LogLevel.error))


def test_close_while_on_connect_waits(tmp_path: Path) -> None:
    server = make_server(tmp_path, options={"connect": "wait"})
    proto, _ = server.connect()
    proto.dataReceived(b"dropped\n")
    lost(proto)
    # The wait returns nil, "closed"; on_connect finishes, then on_close; the input is dropped.
    assert server.log() == ["connect", "connected", "close nil"]
    assert len(server.engine.connections) == 0


# Closing ------------------------------------------------------------------------------------


def test_idle_connection_is_closed_after_read_timeout(tmp_path: Path) -> None:
    server = make_server(tmp_path, read_timeout=5)
    clock = server.engine.clock
    proto, transport = server.connect()
    clock.advance(4)
    proto.dataReceived(b"x")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close read timeout"


@pytest.mark.parametrize(
    "reason, err", [(ConnectionDone(), "nil"), (ConnectionLost(), "connection lost")]
)
def test_on_close_runs_once_with_err(server: Server, reason: Exception, err: str) -> None:
    proto, _ = server.connect()
    lost(proto, reason)
    lost(proto, reason)
    assert server.log() == ["connect", "connected", f"close {err}"]
    assert len(server.engine.connections) == 0 and server.factory.open_protocols == set()


def test_on_close_after_the_current_callback(server: Server) -> None:
    proto, _ = server.connect()
    proto.dataReceived(b"wait\nqueued\n")
    lost(proto)
    assert server.log()[2:] == ["msg wait", "close nil"]


def test_too_many_pending_messages_close(server: Server) -> None:
    proto, transport = server.connect()
    proto.dataReceived(b"wait\n" + b"m\n" * 256)
    assert not transport.disconnecting and proto.session.pending == 256
    proto.dataReceived(b"m\n")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close too many pending messages"


def test_shutdown_closes_with_server_stopping(server: Server) -> None:
    proto, transport = server.connect()
    server.factory.shutdown()
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close server stopping"


def test_connect_and_close_log_lines(server: Server, events: LogCapture) -> None:
    proto, _ = server.connect()
    lost(proto, ConnectionLost())
    client_id = proto.conn.client_id
    debug = events.texts(level=LogLevel.debug)
    assert f"client {client_id} connected from 127.0.0.1:50000 on 12345" in debug  # the bound port
    assert f"client {client_id} closed: connection lost" in debug
    proto2, _ = server.connect()
    lost(proto2)
    assert f"client {proto2.conn.client_id} closed: normal" in events.texts(level=LogLevel.debug)


# Shipped codecs -------------------------------------------------------------------------------

def test_text_codec(tmp_path: Path) -> None:
    server = codec_server(tmp_path, "text", max_message_size=1 << 20)
    proto, transport = server.connect()
    proto.dataReceived(b"a\r\nb\n\n\r\n")
    assert server.log() == ["a", "b", "", ""]
    server.engine.router.send(proto.conn.client_id, b"out", False)
    assert transport.value() == b"out\n"
    proto.dataReceived(b"x" * 65535)
    assert not transport.disconnecting
    proto.dataReceived(b"x")
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close protocol error: input rejected"


def test_jsonrpc_codec(tmp_path: Path) -> None:
    server = codec_server(tmp_path, "jsonrpc")
    proto, transport = server.connect()
    proto.dataReceived(b'{"method":"add","params":[1,2],"id":7}\n')
    assert json.loads(server.log()[0]) == {"method": "add", "params": [1, 2], "id": 7}
    server.engine.router.send(proto.conn.client_id, b'{"result":3}', False)
    assert transport.value() == b'{"result":3}\n'
    # Not a request: the connection is closed (cleanly, by the codec) and nothing reaches on_message.
    proto.dataReceived(b'{"method":"add"}\n{"method":"x","params":[]}\n')
    assert transport.disconnecting and len(server.log()) == 1
    lost(proto)
    assert server.log()[-1] == "close nil"


@pytest.mark.parametrize("line", [b"not json", b"[1,2]", b'{"params":[]}', b'"method"'])
def test_jsonrpc_codec_closes_on_bad_requests(tmp_path: Path, line: bytes) -> None:
    server = codec_server(tmp_path, "jsonrpc")
    proto, transport = server.connect()
    proto.dataReceived(line + b"\n")
    assert transport.disconnecting and server.log() == []


def test_jsonrpc_encode_table(tmp_path: Path) -> None:
    server = codec_server(tmp_path, "jsonrpc")
    encode_table = module_function(server, "protocols.jsonrpc", "encode_table")
    script = server.engine.script
    assert encode_table(script.table({b"a": 1})) == b'{"a":1}\n'
    assert encode_table(script.table({b"f": encode_table}))[0] is None


def test_websocket_accept_key(tmp_path: Path) -> None:
    server = codec_server(tmp_path, "websocket", ", '/'")
    accept = module_function(server, "protocols.websocket", "accept_key")
    assert accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3


def test_websocket_codec_handshake(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    response = transport.value().decode()
    assert response.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith("\r\n\r\n")
    headers = proto.conn.context["headers"]
    assert headers["upgrade"] == "WebSocket" and headers["x-twice"] == "a, b"
    assert headers["host"] == "example"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (HANDSHAKE.replace(b"/chat?x=1", b"/other"), b"404"),
        (HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"), b"400"),
        (HANDSHAKE.replace(b"Upgrade: WebSocket", b"Upgrade: h2c"), b"400"),
        (HANDSHAKE.replace(b"keep-alive, Upgrade", b"keep-alive"), b"400"),
        (HANDSHAKE.replace(b"Version: 13", b"Version: 8"), b"426"),
        (HANDSHAKE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short"), b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000, b"400"),
    ],
)
def test_websocket_codec_refuses_bad_handshakes(tmp_path: Path, request_bytes: bytes, status: bytes) -> None:
    server = codec_server(tmp_path, "websocket", ", '/chat'", max_message_size=1 << 20)
    proto, transport = server.connect()
    proto.dataReceived(request_bytes)
    assert transport.value().startswith(b"HTTP/1.1 " + status) and transport.disconnecting
    lost(proto)
    assert server.log() == ["close protocol error: input rejected"]


def test_websocket_codec_frames(tmp_path: Path) -> None:
    # A frame with the largest payload (65535) has a header too: the unframed input may then
    # exceed the default maxMessageSize (65536) while the frame is incomplete.
    server, proto, transport = open_websocket(tmp_path, max_message_size=1 << 20)
    transport.clear()
    big = os.urandom(70_000 // 2).hex()[:65535].encode()
    stream = (
        client_frame(1, b"hello")
        + client_frame(2, b"\x00\xff", mask=b"\x00\x00\x00\x00")
        + client_frame(1, b"frag", fin=False)
        + client_frame(9, b"are you there")
        + client_frame(0, b"ment", fin=True)
        + client_frame(10, b"unsolicited")
        + client_frame(1, big)
    )
    for i in range(0, len(stream), 777):
        proto.dataReceived(stream[i:i + 777])
    messages = [json.loads(m) for m in server.log()]
    assert messages[:4] == [
        {"type": "text", "data": "hello", "finish": True},
        {"type": "binary", "data": "\x00\ufffd", "finish": True},
        {"type": "text", "data": "frag", "finish": False},
        {"type": "text", "data": "ment", "finish": True},
    ]
    assert messages[4]["data"] == big.decode() and len(messages) == 5
    assert server_frames(transport.value()) == [(10, b"are you there")]
    transport.clear()
    for data, binary in ((b"x" * 125, False), (b"y" * 126, True), (b"z" * 65536, False)):
        server.engine.router.send(proto.conn.client_id, data, binary)
    assert server_frames(transport.value()) == [(1, b"x" * 125), (2, b"y" * 126), (1, b"z" * 65536)]
    transport.clear()
    proto.dataReceived(client_frame(8, struct.pack("!H", 1000) + b"bye"))
    assert server_frames(transport.value()) == [(8, struct.pack("!H", 1000))]
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close nil"


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(1, b"x")[:1] + bytes([1]) + b"x",  # not masked
        bytes([0xC1]) + client_frame(1, b"x")[1:],  # RSV1 without an extension
        client_frame(9, b"x" * 126),  # control payload too large
        client_frame(9, b"x", fin=False),  # fragmented control frame
        client_frame(0, b"x"),  # continuation without a start
        client_frame(3, b"x"),  # reserved opcode
        client_frame(1, b"a", fin=False) + client_frame(1, b"b"),  # new message inside a fragmented one
    ],
)
def test_websocket_codec_rejects_bad_frames(tmp_path: Path, frame: bytes) -> None:
    server, proto, transport = open_websocket(tmp_path)
    proto.dataReceived(frame)
    assert transport.disconnecting
    lost(proto)
    assert server.log()[-1] == "close protocol error: input rejected"


def test_websocket_codec_state_survives_a_hot_reload(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    script = server.engine.script
    script.use(script.compile())  # fresh module state, same connection context
    proto.dataReceived(client_frame(1, b"after reload"))
    assert json.loads(server.log()[-1])["data"] == "after reload"


# Integration: the real service tree ------------------------------------------------------------


def socket_config(entry: str, **overrides: Any) -> Any:
    return loopback_config(protocol="socket", entry=str(REPO / "lua" / entry), **overrides)


@in_asyncio
async def test_socket_entry_lines_reach_the_queue_and_mesh_send_reaches_the_client() -> None:
    running = await start_engine(socket_config("entry.socket.lua"))
    try:
        port = running.service.engine.protocol_listeners[0].actual_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with websockets.connect(running.api_url) as api:
            assert (await api_call(api, "queue.consume", ["foo"]))["result"] == {"success": True}
            writer.write(b"hello\r\nwor")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"ld\n")
            first, second = await next_event(api), await next_event(api)
            assert first["result"]["data"] == {"msg": "hello", "ctx": []}
            assert second["result"]["data"]["msg"] == "world"
            client_id = first["result"]["client_id"]
            assert second["result"]["client_id"] == client_id and len(client_id) == 19
            reply = await api_call(api, "mesh.send", [{"client_id": client_id, "data": "hello, world!"}])
            assert reply["result"] == {"fail": 0, "success": True, "total": 1}
            assert await asyncio.wait_for(reader.readline(), 5) == b"hello, world!\n"
        writer.close()
        await until(lambda: len(running.service.engine.connections) == 0)
    finally:
        await running.stop()


@in_asyncio
async def test_websocket_client_against_the_lua_websocket_codec() -> None:
    options = (("path", "/ws"),)
    running = await start_engine(socket_config("entry.socket.websocket.lua", options=options))
    try:
        port = running.service.engine.protocol_listeners[0].actual_port
        async with websockets.connect(running.api_url) as api:
            await api_call(api, "queue.consume", ["foo"])
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(f"ws://127.0.0.1:{port}/other")
            assert refused.value.response.status_code == 404
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/room?x=1") as client:
                await client.send("test")
                event = await next_event(api)
                data = event["result"]["data"]
                assert data["msg"] == {"data": "test", "finish": True, "type": "text"}
                assert data["ctx"]["headers"]["host"] == f"127.0.0.1:{port}"
                assert data["ctx"]["headers"]["upgrade"] == "websocket"
                await client.send(b"\x00\xff")
                binary = (await next_event(api))["result"]["data"]["msg"]
                assert binary == {"data": "AP8=", "finish": True, "type": "binary"}  # base64 of the bytes

                client_id = event["result"]["client_id"]
                reply = await api_call(api, "mesh.send", [{"client_id": client_id, "data": "hello, world!"}])
                assert reply["result"]["success"] is True
                assert await asyncio.wait_for(client.recv(), 5) == "hello, world!"
                long = "x" * 70_000  # one 64-bit-length frame from the server
                await api_call(api, "mesh.send", [{"client_id": client_id, "data": long}])
                assert await asyncio.wait_for(client.recv(), 5) == long

                pong = await client.ping(b"are you there")
                await asyncio.wait_for(pong, 5)
            assert client.close_code == 1000
            await until(lambda: len(running.service.engine.connections) == 0)
    finally:
        await running.stop()
