"""Client-only floods and handshake abuse (issue 11), in process on 127.0.0.1 port 0.

Each test is what a hostile client did to the engine before the fix: pings without reading
(pongs now count against ``maxWriteBuffer`` / ``writeTimeout``), endless handshake headers (431
at 16 KiB), HTTP bodies of any size (413 before they are read or authenticated), several upgrade
requests on one TCP connection (one ``on_handshake``, one ``101``, one registration), refusal
status/reason from ``on_handshake`` in the status line (sanitised), and the exact write-timeout
progress check.  The real-process variants with RSS bounds are in test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
import websockets
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from conftest import in_asyncio, loopback_config, start_engine
from netclients import connect, masked_frame, read_all, read_head, until, upgrade_request
from connmix_tx.config import AccessConfig, UserConfig
from connmix_tx.engine.outbound import WriteWatch
from connmix_tx.engine.websocket import MAX_HANDSHAKE, ClientWebSocketProtocol, refusal

PING = 9
ALICE = UserConfig("alice", "s3cret", ("read", "write"), "*")


# Helpers --------------------------------------------------------------------------------------


async def flood(sock: socket.socket, frame: bytes, limit: int, alive: Any) -> int:
    """Write ``frame`` repeatedly (never reading) until ``alive()`` is false, the peer is gone
    or ``limit`` bytes were written; return the bytes written."""
    loop = asyncio.get_running_loop()
    batch = frame * (65536 // len(frame))
    sent = 0
    while sent < limit and alive():
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, batch), 2)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            break
        sent += len(batch)
        await asyncio.sleep(0)
    return sent


def small_send_buffer(transport: Any) -> None:
    while not hasattr(transport, "getHandle"):
        transport = transport.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def with_api(config: Any, **fields: Any) -> Any:
    engine = config.engine
    return dataclasses.replace(config, engine=dataclasses.replace(
        engine, api_server=dataclasses.replace(engine.api_server, **fields)))


def entry(tmp_path: Path, source: str) -> str:
    path = tmp_path / "entry.lua"
    path.write_text(source)
    return str(path)


# Ping floods --------------------------------------------------------------------------------


@in_asyncio
async def test_ping_flood_without_reading_closes_the_protocol_client_at_max_write_buffer() -> None:
    running = await start_engine(loopback_config(max_write_buffer=65536, write_timeout=0))
    try:
        engine = running.service.engine
        port = engine.protocol_listeners[0].actual_port
        sock = await connect(port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        await until(lambda: len(engine.connections.by_id) == 1)
        small_send_buffer(next(iter(engine.connections.by_id.values())).transport)
        sent = await flood(sock, masked_frame(b"p" * 125, PING), 64 << 20,
                           lambda: len(engine.connections.by_id) == 1)
        # Before: 64 MiB of pings were taken and answered into an unbounded queue.
        assert sent < 32 << 20
        await until(lambda: not engine.connections.by_id)
        sock.close()
    finally:
        await running.stop()


@in_asyncio
async def test_pongs_count_against_write_timeout() -> None:
    running = await start_engine(loopback_config(max_write_buffer=64 << 20, write_timeout=1))
    try:
        engine = running.service.engine
        port = engine.protocol_listeners[0].actual_port
        sock = await connect(port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        await until(lambda: len(engine.connections.by_id) == 1)
        small_send_buffer(next(iter(engine.connections.by_id.values())).transport)
        await flood(sock, masked_frame(b"p" * 125, PING), 2 << 20, lambda: True)
        # The pongs sit in the queue, nothing reads them: aborted after writeTimeout.
        await until(lambda: not engine.connections.by_id, timeout=6)
        sock.close()
    finally:
        await running.stop()


@in_asyncio
async def test_pongs_count_against_write_timeout_on_the_api_server() -> None:
    running = await start_engine(with_api(loopback_config(), max_write_buffer=64 << 20, write_timeout=1))
    try:
        factory = running.service.engine.api_factory
        port = running.api_port
        sock = await connect(port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port, "/ws/v1"))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        await until(lambda: len(factory.open_protocols) == 1)
        small_send_buffer(next(iter(factory.open_protocols)).transport)
        await flood(sock, masked_frame(b"p" * 125, PING), 2 << 20, lambda: True)
        await until(lambda: not factory.open_protocols, timeout=6)
        sock.close()
    finally:
        await running.stop()


@in_asyncio
async def test_ping_flood_without_reading_closes_the_api_connection() -> None:
    running = await start_engine(with_api(loopback_config(), max_write_buffer=65536, write_timeout=0))
    try:
        factory = running.service.engine.api_factory
        port = running.api_port
        sock = await connect(port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port, "/ws/v1"))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        await until(lambda: len(factory.open_protocols) == 1)
        proto = next(iter(factory.open_protocols))
        small_send_buffer(proto.transport)
        sent = await flood(sock, masked_frame(b"p" * 125, PING), 64 << 20,
                           lambda: proto in factory.open_protocols and not proto._slow)
        assert sent < 32 << 20
        assert proto._slow
        sock.close()
    finally:
        await running.stop()


# Handshake size and pipelining ----------------------------------------------------------------


@in_asyncio
async def test_endless_handshake_headers_get_431_and_close() -> None:
    running = await start_engine(loopback_config())
    try:
        port = running.service.engine.protocol_listeners[0].actual_port
        loop = asyncio.get_running_loop()
        sock = await connect(port)
        await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        try:
            for _ in range(4 * MAX_HANDSHAKE // len(line)):
                await loop.sock_sendall(sock, line)
        except ConnectionError:
            pass
        answer = await read_all(sock)
        assert answer.startswith(b"HTTP/1.1 431 ")
        sock.close()
        # A handshake with large but allowed headers still opens.
        sock = await connect(port)
        await loop.sock_sendall(sock, upgrade_request(port, extra="X-Big: " + "b" * 12000 + "\r\n"))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        sock.close()
    finally:
        await running.stop()


WAITING_HANDSHAKE = """
handshakes = 0
function on_handshake(client_id, headers, server)
  handshakes = handshakes + 1
  mix.log(mix.INFO, "on_handshake number " .. handshakes)
  mix.websocket():wait_context_value("never", 0.3)
end
function on_message(msg) mix.websocket():send(msg.data) end
function on_close(client_id, err) end
"""


@pytest.mark.parametrize("together", [True, False])
@in_asyncio
async def test_pipelined_upgrades_open_one_websocket(tmp_path: Path, together: bool) -> None:
    logged: list[str] = []

    def observe(event: dict) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_HANDSHAKE)))
    try:
        engine = running.service.engine
        port = engine.protocol_listeners[0].actual_port
        loop = asyncio.get_running_loop()
        sock = await connect(port)
        requests = [upgrade_request(port) for _ in range(3)]
        if together:
            await loop.sock_sendall(sock, b"".join(requests))
        else:
            for request in requests:
                await loop.sock_sendall(sock, request)
                await asyncio.sleep(0.05)
        seen = []
        await until(lambda: seen.append(len(engine.connections.by_id)) or len(seen) > 20, timeout=5)
        answer = await read_all(sock, timeout=3)
        # Before: three on_handshake runs, three 101s, two registrations left behind.
        assert answer.count(b"HTTP/1.1 101") == 1
        assert max(seen) <= 1
        assert [line for line in logged if "on_handshake number" in line] == ["on_handshake number 1"]
        # The bytes after the first request were frames of that WebSocket (a protocol error).
        await until(lambda: not engine.connections.by_id)
        sock.close()
    finally:
        globalLogPublisher.removeObserver(observe)
        await running.stop()


@in_asyncio
async def test_a_peer_leaving_while_on_handshake_waits_gets_no_upgrade(tmp_path: Path) -> None:
    import gc

    logged: list[str] = []

    def observe(event: dict) -> None:
        logged.append(formatEvent(event) + str(event.get("log_failure", "")))

    globalLogPublisher.addObserver(observe)
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_HANDSHAKE)))
    try:
        engine = running.service.engine
        factory = engine.client_factories[0]
        port = engine.protocol_listeners[0].actual_port
        sock = await connect(port)
        # The request and a frame after it, then gone before on_handshake returns.
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port) + b"junk")
        await until(lambda: len(factory.open_protocols) == 1)
        proto = next(iter(factory.open_protocols))
        sock.close()
        await until(lambda: not factory.open_protocols)
        await asyncio.sleep(0.5)  # on_handshake's wait ends
        gc.collect()
        assert proto.state == proto.STATE_CLOSED
        assert not engine.connections.by_id
        # Before: a 101 to nobody, the kept bytes parsed, and AlreadyCalledError unhandled.
        assert not [line for line in logged if "AlreadyCalledError" in line or "Unhandled" in line]
    finally:
        globalLogPublisher.removeObserver(observe)
        await running.stop()


LONG_HANDSHAKE = """
function on_handshake(client_id, headers, server)
  mix.websocket():wait_context_value("never", 3)
end
function on_message(msg) end
function on_close(client_id, err) end
"""


@in_asyncio
async def test_bytes_sent_while_on_handshake_waits_are_bounded(tmp_path: Path) -> None:
    running = await start_engine(loopback_config(entry=entry(tmp_path, LONG_HANDSHAKE)))
    try:
        engine = running.service.engine
        factory = engine.client_factories[0]
        port = engine.protocol_listeners[0].actual_port
        limit = factory.config.max_message_size
        sock = await connect(port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, upgrade_request(port))
        await until(lambda: len(factory.open_protocols) == 1)
        proto = next(iter(factory.open_protocols))
        junk = upgrade_request(port) * 2000
        sent = 0
        while sent < 8 * limit:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, junk), 1)
            except asyncio.TimeoutError:
                break
            sent += len(junk)
        # Reading paused: the engine holds at most maxMessageSize and one read more.
        assert proto._paused
        assert len(proto.data) <= limit + 65536
        sock.close()
    finally:
        await running.stop()


REFUSING = """
function on_handshake(client_id, headers, server)
  local case = headers["x-case"]
  if case == "split" then return false, 400, "No\\r\\nSet-Cookie: owned=1\\r\\n\\r\\n<html>" end
  if case == "zero" then return false, 0, "Zero" end
  if case == "switch" then return false, 101, "Switching" end
  if case == "huge" then return false, 99999, "Huge" end
  if case == "long" then return false, 451, string.rep("x", 5000) end
  if case == "ok" then return false, 429, "Slow Down" end
end
function on_message(msg) end
function on_close(client_id, err) end
"""


@pytest.mark.parametrize("case, status_line", [
    ("split", b"HTTP/1.1 400 NoSet-Cookie: owned=1<html>"),
    ("zero", b"HTTP/1.1 403 Zero"),
    ("switch", b"HTTP/1.1 403 Switching"),
    ("huge", b"HTTP/1.1 403 Huge"),
    ("long", b"HTTP/1.1 451 " + b"x" * 120),
    ("ok", b"HTTP/1.1 429 Slow Down"),
])
@in_asyncio
async def test_refusal_status_and_reason_are_sanitised(tmp_path: Path, case: str, status_line: bytes) -> None:
    running = await start_engine(loopback_config(entry=entry(tmp_path, REFUSING)))
    try:
        port = running.service.engine.protocol_listeners[0].actual_port
        sock = await connect(port)
        request = upgrade_request(port, extra=f"X-Case: {case}\r\n")
        await asyncio.get_running_loop().sock_sendall(sock, request)
        head = await read_head(sock)
        lines = head.split(b"\r\n")
        assert lines[0] == status_line
        assert not any(line.lower().startswith(b"set-cookie") for line in lines)
        sock.close()
    finally:
        await running.stop()


@in_asyncio
async def test_headers_the_spent_lua_memory_cannot_hold_are_refused_with_500(monkeypatch: Any) -> None:
    """A runtime whose memory the script has used up cannot take the request headers: the upgrade
    is refused with 500 (as when on_handshake fails), nothing is registered, the server serves on."""
    from connmix_tx.engine import websocket
    from connmix_tx.lua.convert import MemoryShortage

    real = websocket.py_to_lua
    running = await start_engine(loopback_config())
    try:
        port = running.service.engine.protocol_listeners[0].actual_port

        def spent(runtime: Any, value: Any) -> Any:
            raise MemoryShortage()

        monkeypatch.setattr(websocket, "py_to_lua", spent)
        sock = await connect(port)
        await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port))
        assert (await read_head(sock)).split(b"\r\n")[0] == b"HTTP/1.1 500 Internal Server Error"
        sock.close()
        assert len(running.service.engine.connections) == 0
        monkeypatch.setattr(websocket, "py_to_lua", real)
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("still serving")
    finally:
        await running.stop()


def test_refusal_defaults() -> None:
    assert refusal((False,)) == (403, "Forbidden")
    assert refusal((False, True, b"\r\n")) == (403, "Forbidden")
    assert refusal((False, 404.0, b"Gone\x00\x1b[31m")) == (404, "Gone[31m")


def test_protocol_error_text_is_not_python_bytes() -> None:
    proto = ClientWebSocketProtocol()
    proto.localCloseCode = 1002
    proto.localCloseReason = b"encountered invalid syntax"
    assert proto._close_reason(False) == "protocol error: encountered invalid syntax"


# HTTP API bodies ------------------------------------------------------------------------------


async def http(port: int, head: bytes, body_chunks: list[bytes] = (), timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock = await connect(port)
    try:
        await loop.sock_sendall(sock, head)
        for chunk in body_chunks:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 2)
            except (ConnectionError, asyncio.TimeoutError):
                break
        return await read_all(sock, timeout)
    finally:
        sock.close()


def post(length: int | None, authorization: str | None = None) -> bytes:
    head = b"POST /v1/mesh/send HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    if authorization:
        head += b"authorization: " + authorization.encode() + b"\r\n"
    if length is None:
        head += b"transfer-encoding: chunked\r\n"
    else:
        head += b"content-length: %d\r\n" % length
    return head + b"\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("protected", [False, True])
@in_asyncio
async def test_http_body_over_max_message_size_is_413_before_reading(protected: bool) -> None:
    config = loopback_config()
    if protected:
        config = dataclasses.replace(config, access=AccessConfig(users=(ALICE,), protected=True))
    running = await start_engine(config)
    try:
        port = running.api_port
        limit = running.service.engine.api_factory.config.max_message_size
        # A declared 1 GiB body: refused from the headers alone, no credentials needed to learn it.
        answer = await http(port, post(1 << 30))
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert answer.endswith(b'{"E":{"c":-32600,"m":"request too large"},"r":null}')
        basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        answer = await http(port, post(1 << 30, basic))
        assert answer.startswith(b"HTTP/1.1 413 ")
        # A chunked body is cut once it grows past the limit, and the connection closed.
        piece = chunk(b"x" * 65536)
        answer = await http(port, post(None), [piece] * (4 * limit // 65536 + 8))
        assert answer.startswith(b"HTTP/1.1 413 ")
        # At the limit, a body still reaches the method (and its auth check).
        answer = await http(port, post(limit), [b"{" + b" " * (limit - 2) + b"}"])
        assert not answer.startswith(b"HTTP/1.1 413"), answer[:100]
    finally:
        await running.stop()


# The write-timeout progress check -------------------------------------------------------------


class FakeSocketTransport:
    """Twisted's ``FileDescriptor`` queue: ``dataBuffer`` from ``offset`` plus the temp list."""

    def __init__(self) -> None:
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0

    def write(self, data: bytes) -> None:
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)

    def writeSomeData(self, data: bytes) -> int:
        return len(data)  # the kernel takes everything (a prompt reader)

    def doWrite(self) -> None:
        self.dataBuffer, self.offset = b"".join(self._tempDataBuffer), 0
        self._tempDataBuffer, self._tempDataLen = [], 0
        self.offset += self.writeSomeData(self.dataBuffer)
        if self.offset == len(self.dataBuffer):
            self.dataBuffer, self.offset = b"", 0


class Watched:
    def __init__(self) -> None:
        self.transport = FakeSocketTransport()
        self.write_timeout = 1.0
        self.timed_out = False

    def write_timed_out(self) -> None:
        self.timed_out = True


def test_a_prompt_reader_with_slow_replies_is_not_timed_out() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    conn = Watched()
    for _ in range(20):
        # A reply is written (and queued until the reactor flushes it)...
        conn.transport.write(b"r" * 100)
        watch.written(conn)
        clock.advance(0.3)
        # ...the client reads it at once, and the next reply is written before the tick.
        conn.transport.doWrite()
        conn.transport.write(b"r" * 100)
        watch.written(conn)
        clock.advance(0.3)
        conn.transport.doWrite()
    assert not conn.timed_out


def test_a_stuck_queue_still_times_out() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    conn = Watched()
    conn.transport.write(b"r" * 100)
    watch.written(conn)
    for _ in range(6):
        clock.advance(0.5)
    assert conn.timed_out


@pytest.mark.parametrize("together", [True, False])
@in_asyncio
async def test_pipelined_upgrades_on_the_api_server_open_one_websocket(together: bool) -> None:
    running = await start_engine(loopback_config())
    try:
        factory = running.service.engine.api_factory
        port = running.api_port
        loop = asyncio.get_running_loop()
        sock = await connect(port)
        requests = [upgrade_request(port, "/ws/v1") for _ in range(3)]
        if together:
            await loop.sock_sendall(sock, b"".join(requests))
        else:
            for request in requests:
                await loop.sock_sendall(sock, request)
                await asyncio.sleep(0.05)
        answer = await read_all(sock, timeout=2)
        assert answer.count(b"HTTP/1.1 101") == 1, answer[:300]
        assert len(factory.open_protocols) <= 1
        sock.close()
        await until(lambda: not factory.open_protocols)
    finally:
        await running.stop()
