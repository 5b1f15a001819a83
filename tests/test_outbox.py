"""Tests for connmix_tx.engine.outbox: client writes of a reactor turn, sent once at its end.

Most tests use real loopback sockets with the running reactor: a Twisted ``tcp.Server`` (or
``tcp.Client``) transport on one side and a plain, non-blocking socket read from asyncio as the
independent peer.  Each test writes in one turn (synchronous code between two awaits) and looks at
what the peer got, the kernel sends (``writeSomeData`` calls) and the reactor's writers.  The
integration tests run the real service tree: ``mesh.send`` deliveries go through the outbox, and a
client that never reads is still closed at ``maxWriteBuffer``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import pytest
import websockets
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.engine.outbound import buffered_bytes
from connmix_tx.engine.outbox import Outbox
from connmix_tx.testing import LogCapture
from netclients import raw_handshake, until


# A Twisted side and an independent peer ----------------------------------------------------------


class Recorder(Protocol):
    """The Twisted side: keeps its transport, and why it was lost."""

    def __init__(self) -> None:
        self.made: Deferred = Deferred()
        self.lost_reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason


class Pair:
    """A connected Twisted transport and a plain socket peer."""

    def __init__(self, proto: Recorder, peer: socket.socket) -> None:
        self.proto, self.peer = proto, peer

    @property
    def transport(self) -> Any:
        return self.proto.transport

    async def read(self, size: int, timeout: float = 10.0) -> bytes:
        """Exactly ``size`` bytes from the peer (fewer only if the connection ends)."""
        loop = asyncio.get_running_loop()
        data = bytearray()
        while len(data) < size:
            chunk = await asyncio.wait_for(loop.sock_recv(self.peer, min(1 << 20, size - len(data))), timeout)
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def read_to_end(self, timeout: float = 5.0) -> tuple[bytes, bool]:
        """Everything until the connection ends; whether it ended with EOF (not a reset)."""
        loop = asyncio.get_running_loop()
        data = bytearray()
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.peer, 1 << 16), timeout)
            except ConnectionResetError:
                return bytes(data), False
            if not chunk:
                return bytes(data), True
            data += chunk


async def server_pair(rcvbuf: int | None = None) -> tuple[Pair, Any]:
    """A ``tcp.Server`` transport (the engine's side) and a peer connected to it."""
    proto = Recorder()
    factory = Factory.forProtocol(lambda: proto)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    peer = socket.socket()
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(peer, ("127.0.0.1", port.getHost().port)), 5)
    await asyncio.wait_for(proto.made.asFuture(loop), 5)
    return Pair(proto, peer), port


async def client_pair() -> tuple[Pair, Any]:
    """A ``tcp.Client`` transport connected to a plain listening socket (the peer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    proto = Recorder()
    factory = ClientFactory.forProtocol(lambda: proto)
    connector = reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)
    loop = asyncio.get_running_loop()
    peer, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
    peer.setblocking(False)
    listener.close()
    await asyncio.wait_for(proto.made.asFuture(loop), 5)
    return Pair(proto, peer), connector


async def close_pair(pair: Pair, port: Any) -> None:
    if pair.proto.lost_reason is None:
        pair.transport.abortConnection()
    pair.peer.close()
    if hasattr(port, "stopListening"):
        await asyncio.wait_for(port.stopListening().asFuture(asyncio.get_running_loop()), 5)
    await until(lambda: pair.proto.lost_reason is not None, timeout=3)


def count_sends(transport: Any) -> list[int]:
    """Wrap ``transport.writeSomeData``: the sizes of the sends, as they happen."""
    sizes: list[int] = []
    inner = transport.writeSomeData

    def send(data: Any) -> Any:
        sizes.append(len(data))
        return inner(data)

    transport.writeSomeData = send
    return sizes


def pattern(start: int, count: int) -> bytes:
    """``count`` consecutive big-endian integers from ``start``: any loss or reorder shows."""
    return b"".join(struct.pack("!I", i) for i in range(start, start + count))


async def flushed(outbox: Outbox) -> None:
    await until(lambda: outbox.pending == 0, timeout=3)


# Order, one send, no writability registration ---------------------------------------------------


@pytest.mark.parametrize("side", ["server", "client"])
@in_asyncio
async def test_outbox_and_plain_writes_of_one_turn_arrive_in_call_order(side: str) -> None:
    pair, port = await (server_pair() if side == "server" else client_pair())
    try:
        t = pair.transport
        assert type(t) is (tcp.Server if side == "server" else tcp.Client)
        outbox = Outbox(reactor)
        outbox.write(t, b"a1")
        t.write(b"b2")  # e.g. a pong or close frame Autobahn writes itself
        outbox.write(t, b"c3")
        t.writeSequence([b"d4", b"e5"])
        outbox.write(t, b"f6")
        assert await pair.read(12) == b"a1b2c3d4e5f6"
        await flushed(outbox)
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_many_writes_of_one_turn_are_one_send_without_registering_for_writability() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        sends = count_sends(t)
        outbox = Outbox(reactor)
        for i in range(100):
            outbox.write(t, pattern(i * 25, 25))  # 100 bytes each
        assert t not in reactor.getWriters() and outbox.pending == 1 and sends == []
        await flushed(outbox)
        assert sends == [10_000]  # one send for the whole turn
        assert t not in reactor.getWriters() and buffered_bytes(t) == 0
        assert await pair.read(10_000) == pattern(0, 2500)
        # A later turn: again one send.
        outbox.write(t, b"x" * 10)
        outbox.write(t, b"y" * 10)
        await flushed(outbox)
        assert sends == [10_000, 20] and t not in reactor.getWriters()
        assert await pair.read(20) == b"x" * 10 + b"y" * 10
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_one_flush_serves_every_connection_written_in_the_turn() -> None:
    pairs = [await server_pair() for _ in range(5)]
    try:
        outbox = Outbox(reactor)
        for round_ in range(3):
            for n, (pair, _) in enumerate(pairs):
                outbox.write(pair.transport, f"{n}:{round_};".encode())
        assert outbox.pending == 5
        await flushed(outbox)
        for n, (pair, _) in enumerate(pairs):
            assert await pair.read(12) == f"{n}:0;{n}:1;{n}:2;".encode()
            assert pair.transport not in reactor.getWriters()
    finally:
        for pair, port in pairs:
            await close_pair(pair, port)


@in_asyncio
async def test_a_peer_that_does_not_read_gets_everything_in_order_once_it_reads() -> None:
    pair, port = await server_pair(rcvbuf=4096)
    try:
        t = pair.transport
        t.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        outbox = Outbox(reactor)
        chunk = 16384  # integers per write: 64 KiB
        total = 0
        for turn in range(4):  # 4 turns of 16 writes: 4 MiB
            for _ in range(16):
                outbox.write(t, pattern(total, chunk))
                total += chunk
            await flushed(outbox)
        # The kernel took a little; the rest waits in Twisted's buffer, the reactor's to send.
        assert buffered_bytes(t) > 3 << 20
        assert t in reactor.getWriters()
        assert await pair.read(total * 4, timeout=20) == pattern(0, total)
        await until(lambda: buffered_bytes(t) == 0 and t not in reactor.getWriters(), timeout=3)
    finally:
        await close_pair(pair, port)


class Watch:
    """Records what the outbox hands to the write watch."""

    def __init__(self) -> None:
        self.watched: list[Any] = []

    def written(self, conn: Any) -> None:
        self.watched.append(conn)


@in_asyncio
async def test_the_write_watch_learns_of_bytes_the_kernel_did_not_take_at_the_flush() -> None:
    pair, port = await server_pair(rcvbuf=4096)
    try:
        t = pair.transport
        t.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        watch = Watch()
        outbox = Outbox(reactor, watch)  # type: ignore[arg-type]
        outbox.write(t, b"small", "taken")
        await flushed(outbox)
        assert watch.watched == []  # the kernel took it all: nothing to watch
        outbox.write(t, b"x" * (2 << 20), "stuck")
        assert outbox.holds(t)  # until the flush, the turn will send it (the protocol does not watch)
        await flushed(outbox)
        assert not outbox.holds(t)
        assert watch.watched == ["stuck"]  # the rest waits for writability: watched from now on
        assert await pair.read(5 + (2 << 20), timeout=20) == b"small" + b"x" * (2 << 20)
    finally:
        await close_pair(pair, port)


# Counted before the flush -------------------------------------------------------------------------


@in_asyncio
async def test_buffered_bytes_counts_outbox_bytes_before_the_flush() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        outbox = Outbox(reactor)
        outbox.write(t, b"x" * 5000)
        assert buffered_bytes(t) == 5000
        t.write(b"y" * 100)
        outbox.write(t, b"z" * 900)
        assert buffered_bytes(t) == 6000
        await flushed(outbox)
        await until(lambda: buffered_bytes(t) == 0)
        assert await pair.read(6000) == b"x" * 5000 + b"y" * 100 + b"z" * 900
    finally:
        await close_pair(pair, port)


# Closing right after a write ----------------------------------------------------------------------


@in_asyncio
async def test_lose_connection_right_after_an_outbox_write_delivers_then_eof() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        outbox = Outbox(reactor)
        data = pattern(0, 300_000)  # 1.2 MB: more than one send
        outbox.write(t, data[:600_000])
        outbox.write(t, data[600_000:])
        t.loseConnection()
        got, eof = await pair.read_to_end()
        assert eof and got == data
        await until(lambda: pair.proto.lost_reason is not None, timeout=3)
        assert outbox.pending == 0
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_an_outbox_write_after_lose_connection_in_the_same_turn_is_sent_like_a_plain_write() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        outbox = Outbox(reactor)
        outbox.write(t, b"before;")
        t.loseConnection()
        outbox.write(t, b"after;")  # transport.write would still send it, before the FIN
        t.write(b"plain;")
        got, eof = await pair.read_to_end()
        assert eof and got == b"before;after;plain;"
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_abort_right_after_an_outbox_write_drops_it_without_an_error() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        outbox = Outbox(reactor)
        with LogCapture() as logs:
            outbox.write(t, b"x" * 100_000)
            t.abortConnection()
            outbox.write(t, b"after the abort")
            await flushed(outbox)
            await until(lambda: pair.proto.lost_reason is not None, timeout=3)
        assert logs.find("direct write failed") == [], logs.lines
        assert t not in reactor.getWriters() and t not in reactor.getReaders()
        got, _ = await pair.read_to_end()
        assert got == b""  # the queued bytes were dropped, as abortConnection promises
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_a_peer_that_reset_is_noticed_through_the_flush() -> None:
    # The engine is not reading this client (paused behind a callback, say), so only a write
    # can notice that the peer is gone: the failed send goes the reactor's way and ends it.
    pair, port = await server_pair()
    try:
        t = pair.transport
        t.stopReading()
        pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pair.peer.close()
        await asyncio.sleep(0.05)
        outbox = Outbox(reactor)
        with LogCapture() as logs:
            for _ in range(3):  # the first send may still be taken; the next ones fail
                outbox.write(t, b"x" * 1000)
                await flushed(outbox)
                if pair.proto.lost_reason is not None:
                    break
                await asyncio.sleep(0.05)
            await until(lambda: pair.proto.lost_reason is not None, timeout=3)
        assert logs.find("direct write failed") == [], logs.lines
        assert t not in reactor.getWriters()
    finally:
        await close_pair(pair, port)


# Other transports ---------------------------------------------------------------------------------


def test_a_non_socket_transport_gets_a_plain_write_at_once() -> None:
    clock = Clock()
    outbox = Outbox(clock)
    fake = StringTransport()
    outbox.write(fake, b"one;")
    outbox.write(fake, b"two;")
    assert fake.value() == b"one;two;"
    assert outbox.pending == 0 and clock.getDelayedCalls() == []


@in_asyncio
async def test_a_transport_with_a_producer_gets_a_plain_write() -> None:
    class Producer:
        def pauseProducing(self) -> None: ...
        def resumeProducing(self) -> None: ...
        def stopProducing(self) -> None: ...

    pair, port = await server_pair()
    try:
        t = pair.transport
        t.registerProducer(Producer(), True)
        outbox = Outbox(reactor)
        outbox.write(t, b"produced")
        assert outbox.pending == 0 and t in reactor.getWriters()  # transport.write's way
        assert await pair.read(8) == b"produced"
        t.unregisterProducer()
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_empty_writes_and_writes_to_closed_transports_schedule_nothing() -> None:
    pair, port = await server_pair()
    try:
        t = pair.transport
        outbox = Outbox(reactor)
        outbox.write(t, b"")
        assert outbox.pending == 0
        t.abortConnection()
        await until(lambda: pair.proto.lost_reason is not None, timeout=3)
        outbox.write(t, b"too late")
        assert outbox.pending == 0 and buffered_bytes(t) == 0
    finally:
        await close_pair(pair, port)


@in_asyncio
async def test_the_installed_twisted_keeps_the_buffer_layout_the_outbox_relies_on() -> None:
    # Outbox writes into FileDescriptor's own queue; if Twisted renames or reshapes it, this
    # fails here first (and the plain-write order test above would reorder bytes).
    pair, port = await server_pair()
    try:
        t = pair.transport
        t.stopWriting()
        t.write(b"abc")
        assert t._tempDataBuffer[-1] == b"abc" and t._tempDataLen == 3
        assert isinstance(t.dataBuffer, bytes) and t.offset == 0
        assert await pair.read(3) == b"abc"
    finally:
        await close_pair(pair, port)


# Integration: the real service tree ---------------------------------------------------------------


def small_send_buffer(transport: Any) -> None:
    while not hasattr(transport, "getHandle"):
        transport = transport.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def send_request(client_id: str, data: str, request_id: int) -> bytes:
    """One masked ``mesh.send`` frame for the API (several go out in one TCP write)."""
    body = json.dumps({"method": "mesh.send", "params": [{"client_id": client_id, "data": data}],
                       "id": request_id}).encode()
    mask = b"\x11\x22\x33\x44"
    size = len(body)
    head = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else
                            bytes([0x80 | 126]) + size.to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body))


async def api_replies(sock: socket.socket, count: int) -> list[dict]:
    """``count`` text frames from the API on a raw socket, decoded."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    replies: list[dict] = []
    while len(replies) < count:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10)
        assert chunk, replies
        data += chunk
        while len(data) >= 2:
            size, head = data[1] & 0x7F, 2
            if size == 126:
                if len(data) < 4:
                    break
                size, head = int.from_bytes(data[2:4], "big"), 4
            if len(data) < head + size:
                break
            replies.append(json.loads(bytes(data[head:head + size])))
            del data[:head + size]
    return replies


@in_asyncio
async def test_mesh_sends_of_one_api_read_reach_the_client_in_order() -> None:
    running = await start_engine(loopback_config())
    api = await raw_handshake(running.api_port, "/ws/v1", rcvbuf=1 << 20)
    try:
        engine = running.service.engine
        async with websockets.connect(running.client_url, ping_interval=None, max_queue=None) as ws:
            await until(lambda: len(engine.connections.by_id) == 1)
            (client_id,) = engine.connections.by_id
            count = 200
            batch = b"".join(send_request(str(client_id), f"m{i:04d}", i) for i in range(count))
            assert len(batch) < 60_000  # one read of the API server
            await asyncio.get_running_loop().sock_sendall(api, batch)
            got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(count)]
            assert got == [f"m{i:04d}" for i in range(count)]
            replies = await api_replies(api, count)
            assert [r["id"] for r in replies] == list(range(count))
            assert all(r["result"] == {"fail": 0, "success": True, "total": 1} for r in replies)
            factory = engine.client_factories[0]
            assert factory.outbox.pending == 0
    finally:
        api.close()
        await running.stop()


@in_asyncio
async def test_a_client_that_stops_reading_is_closed_as_slow_consumer_by_outbox_deliveries() -> None:
    cap = 65536
    running = await start_engine(loopback_config(max_write_buffer=cap, write_timeout=0))
    engine = running.service.engine
    slow = await raw_handshake(engine.protocol_listeners[0].actual_port)
    api = await raw_handshake(running.api_port, "/ws/v1", rcvbuf=1 << 20)
    try:
        await until(lambda: len(engine.connections.by_id) == 1)
        (client_id,) = engine.connections.by_id
        small_send_buffer(engine.connections.by_id[client_id].transport)
        chunk = 8000
        count = 40  # 320 kB, several deliveries per API read, each in one reactor turn
        batch = b"".join(send_request(str(client_id), f"{i:05d}" + "z" * chunk, i) for i in range(count))
        with LogCapture() as logs:
            await asyncio.get_running_loop().sock_sendall(api, batch)
            replies = await api_replies(api, count)
            await until(lambda: client_id not in engine.connections.by_id, timeout=5)
        (line,) = logs.find(f"close slow client {client_id} buffered=")
        buffered = int(line.rsplit("buffered=", 1)[1])
        # Caught at the first delivery over the cap, though its bytes were still in the outbox.
        assert cap < buffered <= cap + chunk + 16, buffered
        assert logs.find(f"client {client_id} closed: slow consumer")
        ok = [r for r in replies if r.get("error") is None]
        failed = [r for r in replies if r.get("error") is not None]
        assert ok and failed and len(ok) + len(failed) == count
        assert all(r["id"] < failed[0]["id"] for r in ok)  # the cut comes once, at the cap
        assert len(ok) <= (cap + 4096 * 8) // chunk + 1
    finally:
        slow.close()
        api.close()
        await running.stop()
