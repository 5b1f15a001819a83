"""Per-connection limits (docs/operations.md, docs/robustness.md "Clients"): slow consumers, write
timeouts, sizes, handshake deadline, origins, compression, the API's HTTP read timeout.

Unit tests drive ``WriteWatch`` and the protocols' slow-consumer checks with a fake transport
whose write queue the test controls (``connmix_tx.testing.FakeSocketTransport``).
Integration tests run the real service tree on port 0; a client that "never reads" is a raw
socket with a small receive buffer that completes the WebSocket handshake and then reads
nothing more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import websockets
from twisted.internet.task import Clock

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.engine.outbound import WriteWatch, buffered_bytes
from connmix_tx.testing import FakeSocketTransport, FakeTLS, LogCapture
from netclients import http_request, post, raw_handshake, until


# Helpers ------------------------------------------------------------------------------------


class Conn:
    def __init__(self, timeout: float) -> None:
        self.transport = FakeSocketTransport()
        self.write_timeout = timeout
        self.expired = 0

    def write_timed_out(self) -> None:
        self.expired += 1


def only_client(running: Any) -> int:
    ids = list(running.service.engine.connections.by_id)
    assert len(ids) == 1
    return ids[0]


# WriteWatch and buffered_bytes --------------------------------------------------------------


def test_buffered_bytes_reads_the_queue_through_tls_wrappers() -> None:
    inner = FakeSocketTransport()
    inner.write(b"x" * 10)
    assert buffered_bytes(inner) == 10
    inner.take(4)
    assert buffered_bytes(inner) == 6
    assert buffered_bytes(FakeTLS(inner)) == 9  # plus the plaintext the TLS layer still holds
    assert buffered_bytes(object()) == 0


def test_write_watch_aborts_only_without_progress() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    stuck, moving, drained = Conn(2), Conn(2), Conn(2)
    for conn in (stuck, moving, drained):
        conn.transport.write(b"x" * 1000)
        watch.written(conn)
    drained.transport.take(1000)
    for _ in range(6):  # 3 s in 0.5 s ticks; "moving" makes progress every tick
        moving.transport.write(b"y" * 300)
        moving.transport.take(200)
        clock.advance(0.5)
    assert stuck.expired == 1 and moving.expired == 0 and drained.expired == 0
    assert len(watch) == 1  # only "moving" is still watched
    moving.transport.take(10_000)
    clock.advance(0.5)
    assert len(watch) == 0 and clock.getDelayedCalls() == []  # the timer stops when nothing is queued


def test_write_watch_ignores_connections_without_timeout() -> None:
    watch = WriteWatch(Clock())
    conn = Conn(0)
    conn.transport.write(b"x")
    watch.written(conn)
    assert len(watch) == 0


# The API server's slow-consumer close, with a fake transport --------------------------------


def test_api_connection_over_its_write_buffer_is_closed_4008() -> None:
    from connmix_tx.engine.api_server import ApiWebSocketProtocol
    from connmix_tx.metrics import EngineMeter
    from connmix_tx.testing import sample_value

    class Factory:
        meter = EngineMeter()
        write_watch = WriteWatch(Clock())

        class queues:
            unconsumed: list = []

            @classmethod
            def unconsume(cls, session: Any) -> None:
                cls.unconsumed.append(session)

    proto = ApiWebSocketProtocol()
    proto.factory = Factory()  # type: ignore[assignment]
    proto.transport = FakeSocketTransport()
    proto.state = proto.STATE_OPEN
    proto.max_write_buffer, proto.write_timeout = 100, 5
    proto.peer_text = "127.0.0.1:5000"
    proto.session = object()  # type: ignore[assignment]
    closes: list[tuple] = []
    proto.sendMessage = lambda data, binary=False: proto.transport.write(data)  # type: ignore[method-assign]
    proto.sendCloseFrame = lambda code, reason, isReply: closes.append((code, reason))  # type: ignore
    with LogCapture() as logs:
        proto._write(b"a" * 80)
        assert closes == [] and len(Factory.write_watch) == 1
        proto._write(b"b" * 80)
        proto._write(b"c" * 80)  # closing already: counted and logged once
    assert closes == [(4008, b"slow consumer")]
    assert logs.find("close slow api connection 127.0.0.1:5000 buffered=164")  # two 82-byte frames
    assert Factory.queues.unconsumed == [proto.session]
    assert sample_value(Factory.meter, "connmix_engine_slow_disconnects_total", {"kind": "api"}) == 1


# Integration: slow clients, write timeout, sizes ---------------------------------------------


@in_asyncio
async def test_client_that_never_reads_is_cut_off_at_the_cap() -> None:
    running = await start_engine(loopback_config(max_write_buffer=65536))
    sock = await raw_handshake(running.service.engine.protocol_listeners[0].actual_port)
    try:
        await until(lambda: len(running.service.engine.connections.by_id) == 1)
        client_id = only_client(running)
        chunk = "x" * 30000
        with LogCapture() as logs:
            for attempt in range(2000):
                response = await post(running.api_port, "/v1/mesh/send", {"c": str(client_id), "d": chunk})
                error = response.json["E"]
                if error is not None:
                    break
            assert error == {"c": 401, "m": "send failed: slow consumer"}, (attempt, error)
            # Closed with 4008; the peer never answers the close, so it is aborted after 1 s.
            await until(lambda: not running.service.engine.connections.by_id, timeout=3)
        assert logs.find(f"close slow client {client_id} buffered=")
        assert logs.find(f"client {client_id} closed: slow consumer")
        metrics = await http_request(running.api_port, "GET", "/metrics")
        assert b'connmix_engine_slow_disconnects_total{kind="client"} 1.0' in metrics.body
    finally:
        sock.close()
        await running.stop()


@in_asyncio
async def test_queue_that_does_not_move_for_write_timeout_aborts() -> None:
    running = await start_engine(loopback_config(write_timeout=1, max_write_buffer=64 * 1024 * 1024))
    sock = await raw_handshake(running.service.engine.protocol_listeners[0].actual_port)
    try:
        await until(lambda: len(running.service.engine.connections.by_id) == 1)
        client_id = only_client(running)
        # Small kernel buffers on the server side too, so that the queue stays in Twisted.
        conn = running.service.engine.connections.by_id[client_id]
        conn.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with LogCapture() as logs:
            for _ in range(60):  # about 2 MB: far more than the kernel buffers take
                response = await post(running.api_port, "/v1/mesh/send", {"c": str(client_id), "d": "y" * 32000})
                if response.json["E"] is not None:
                    break
            await until(lambda: not running.service.engine.connections.by_id, timeout=4)
        assert logs.find(f"client {client_id} closed: write timeout")
    finally:
        sock.close()
        await running.stop()


@in_asyncio
async def test_oversize_frames_close_1009_on_servers_and_api() -> None:
    config = loopback_config(max_message_size=1024)
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, api_server=dataclasses.replace(config.engine.api_server, max_message_size=2048)))
    running = await start_engine(config)
    try:
        with LogCapture() as logs:
            async with websockets.connect(running.client_url) as client:
                await client.send("a" * 1024)  # exactly the limit: fine
                await client.send("b" * 1025)
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(client.recv(), 5)
            assert client.close_code == 1009
            await until(lambda: logs.find("closed: message too large"))
        async with websockets.connect(running.api_url) as api:
            await api.send(json.dumps({"method": "server.ping", "params": [], "id": "x" * 2100}))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(api.recv(), 5)
        assert api.close_code == 1009
        too_big = await post(running.api_port, "/v1/mesh/send", {"c": "1", "d": "z" * 2100})
        assert too_big.status == 413
    finally:
        await running.stop()


@in_asyncio
async def test_handshake_deadline_includes_a_waiting_on_handshake(tmp_path: Path) -> None:
    entry = tmp_path / "lua" / "entry.lua"
    entry.parent.mkdir()
    entry.write_text(
        'function on_handshake(client_id, headers, server)\n'
        '  local v, err = mix.websocket():wait_context_value("never", 30)\n'
        'end\n'
        'function on_message(msg) end\n'
        'function on_close(client_id, err) end\n'
    )
    running = await start_engine(loopback_config(entry=str(entry)))
    try:
        factory = running.service.engine.client_factories[0]
        assert factory.openHandshakeTimeout == 10  # the default; shortened below
        factory.setProtocolOptions(openHandshakeTimeout=2)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", running.service.engine.protocol_listeners[0].actual_port))
        await loop.sock_sendall(sock, (
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        started = loop.time()
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1000), 5)
        except ConnectionResetError:
            data = b""
        assert data == b""  # dropped without a response
        # Autobahn's batched timers round the deadline down to a whole second: within [1, 2] s.
        assert 0.9 < loop.time() - started < 4
        sock.close()
        await asyncio.sleep(0.1)
        assert not running.service.engine.connections.by_id
        assert running.fatal_calls == []
    finally:
        await running.stop()


def _with_options(config: Any, **options: str) -> Any:
    server = config.engine.servers[0]
    merged = dict(server.options) | options
    return dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, servers=(dataclasses.replace(server, options=tuple(merged.items())),)))


@in_asyncio
async def test_origins_option_globs_case_insensitive_and_missing_origin_allowed() -> None:
    config = _with_options(loopback_config(), origins="https://*.example.com, http://localhost:*")
    running = await start_engine(config)
    try:
        async with websockets.connect(running.client_url, origin="https://APP.Example.com"):
            pass
        async with websockets.connect(running.client_url, origin="http://localhost:8080"):
            pass
        async with websockets.connect(running.client_url):  # no Origin header
            pass
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(running.client_url, origin="https://evil.example.org"):
                pass
        assert refused.value.response.status_code == 403
        await asyncio.sleep(0.1)
        assert not running.service.engine.connections.by_id
    finally:
        await running.stop()


@pytest.mark.parametrize("compression", [False, True])
@in_asyncio
async def test_compression_option_accepts_permessage_deflate_only_when_on(compression: bool) -> None:
    running = await start_engine(loopback_config(compression=compression))
    try:
        async with websockets.connect(running.client_url) as client:  # offers permessage-deflate
            negotiated = [type(e).__name__ for e in client.protocol.extensions]
            await client.send("z" * 5000)
            await asyncio.sleep(0.1)
        assert negotiated == (["PerMessageDeflate"] if compression else [])
    finally:
        await running.stop()


@in_asyncio
async def test_api_http_read_timeout_spares_upgraded_websockets() -> None:
    config = loopback_config()
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, api_server=dataclasses.replace(config.engine.api_server, read_timeout=2)))
    running = await start_engine(config)
    try:
        with LogCapture() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.api_port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # an unfinished request
            started = asyncio.get_running_loop().time()
            async with websockets.connect(running.api_url) as api:
                await asyncio.wait_for(reader.read(), 5)  # the idle HTTP connection is closed
                assert 1.9 < asyncio.get_running_loop().time() - started < 4
                await asyncio.sleep(2.5)  # past the HTTP timeout: the upgraded connection lives on
                await api.send(json.dumps({"method": "server.ping", "params": [], "id": 1}))
                assert json.loads(await asyncio.wait_for(api.recv(), 5))["error"] is None
            writer.close()
        assert not [line for line in logs.lines if "Unhandled" in line or "Traceback" in line]
    finally:
        await running.stop()
