"""Slow readers (issue 5): peers that stop reading are cut off at the cap, memory stays bounded.

Queues (docs/api.md, "Queue events"): a queue consumer is eligible only while less than 256 KiB
is buffered for it; when none is eligible, messages wait in the topic (backpressure) instead of
piling up in a transport.
API connections (docs/robustness.md, "Clients"): one with more than
``engine.apiServer.maxWriteBuffer`` bytes buffered is closed with 4008 and logged as
``close slow api connection {peer} buffered={bytes}``.
Protocol clients (docs/robustness.md, "Clients"): one over ``servers[].maxWriteBuffer`` is closed
as a slow consumer; a ``mesh.publish`` keeps reaching the other subscribers and counts the slow
one in ``fail``.

(The single protocol client cut off by ``mesh.send`` is in test_limits.py; here is the publish
fan-out variant.)  Everything runs in process on 127.0.0.1 port 0.  A client that "never reads"
is a raw socket with a small receive buffer that completes the WebSocket handshake and then
reads nothing; the engine's side of that socket also gets a small send buffer, so what the peer
does not take stays in Twisted's queue, where ``buffered_bytes`` sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from typing import Any

import websockets

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.engine.api import CONSUMER_BUFFER_LIMIT
from connmix_tx.engine.outbound import buffered_bytes
from connmix_tx.testing import LogCapture
from netclients import http_request, masked_frame, raw_handshake, until

CONSUME = '{"method":"queue.consume","params":["foo"],"id":"consume"}'


# Helpers ------------------------------------------------------------------------------------


def small_send_buffer(transport: Any) -> None:
    """Shrink the kernel send buffer of the engine's side of a connection."""
    while not hasattr(transport, "getHandle"):
        transport = transport.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def api_config(max_write_buffer: int, topic_size: int = 2000) -> Any:
    config = loopback_config()
    engine = config.engine
    return dataclasses.replace(config, engine=dataclasses.replace(
        engine,
        api_server=dataclasses.replace(engine.api_server, max_write_buffer=max_write_buffer),
        luavm=dataclasses.replace(engine.luavm, queue=dataclasses.replace(engine.luavm.queue, topic_size=topic_size)),
    ))


def event_index(raw: str | bytes) -> int | None:
    """The message number of a queue event (``m<i>x...``), or None for a reply."""
    message = json.loads(raw)
    if message.get("event") != "queue.consume":
        return None
    return int(message["result"]["data"]["msg"]["data"][1:6])


async def consumer(url: str) -> Any:
    """A well-behaved consumer of ``foo`` (reads everything)."""
    api = await websockets.connect(url, max_queue=None, ping_interval=None)
    await api.send(CONSUME)
    reply = json.loads(await asyncio.wait_for(api.recv(), 5))
    assert reply == {"error": None, "result": {"success": True}, "id": "consume"}
    return api


async def ping(api: Any, request_id: str = "alive") -> None:
    await api.send(json.dumps({"method": "server.ping", "params": [], "id": request_id}))
    while True:
        reply = json.loads(await asyncio.wait_for(api.recv(), 5))
        if reply.get("id") == request_id:
            assert reply == {"error": None, "result": {"status": "server.pong"}, "id": request_id}
            return


async def flood_pings(sock: socket.socket, proto: Any, factory: Any, id_size: int, limit: int) -> int:
    """Send ``server.ping`` requests with a large id from ``sock`` (which never reads) until the
    engine starts closing ``proto``; return how many were sent."""
    loop = asyncio.get_running_loop()
    for sent in range(limit):
        if proto._slow or proto not in factory.open_protocols:
            return sent
        request = json.dumps({"method": "server.ping", "params": [], "id": f"{sent:06d}" + "p" * id_size})
        await loop.sock_sendall(sock, masked_frame(request.encode()))
        if sent % 8 == 7:
            await asyncio.sleep(0)  # let the engine read and answer
    await until(lambda: proto._slow, timeout=2)
    return limit


async def close_code_on_wire(sock: socket.socket, timeout: float = 3.0) -> int | None:
    """Read server frames from ``sock`` (fast, before the engine's 1 s abort) until a close frame;
    return its code, or None if the connection ended first."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    pos = 0
    deadline = loop.time() + timeout
    while True:
        while True:  # parse every complete frame in data[pos:]
            if len(data) - pos < 2:
                break
            opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
            head = 2
            if size == 126:
                head = 4
                if len(data) - pos < head:
                    break
                size = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif size == 127:
                head = 10
                if len(data) - pos < head:
                    break
                size = int.from_bytes(data[pos + 2:pos + 10], "big")
            if len(data) - pos < head + size:
                break
            if opcode == 8:
                return int.from_bytes(data[pos + head:pos + head + 2], "big")
            pos += head + size
        if pos > 1 << 20:
            del data[:pos]
            pos = 0
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), max(0.01, deadline - loop.time()))
        except (ConnectionResetError, asyncio.TimeoutError):
            return None
        if not chunk:
            return None
        data += chunk


def slow_count(metrics_body: bytes, kind: str) -> float:
    prefix = f'connmix_engine_slow_disconnects_total{{kind="{kind}"}} '.encode()
    for line in metrics_body.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"no slow_disconnects metric for {kind}")


# An API consumer that stops reading ---------------------------------------------------------


N = 2000
PAYLOAD = 1024


@in_asyncio
async def test_api_consumer_that_stops_reading_gets_backpressure_then_is_closed_4008() -> None:
    cap = 1024 * 1024  # engine.apiServer.maxWriteBuffer, above the 256 KiB eligibility limit
    running = await start_engine(api_config(max_write_buffer=cap, topic_size=N + 100))
    engine = running.service.engine
    factory, queues = engine.api_factory, engine.queues
    slow = await raw_handshake(running.api_port, "/ws/v1")
    good = producer = None
    try:
        await until(lambda: len(factory.open_protocols) == 1)
        (proto,) = factory.open_protocols
        small_send_buffer(proto.transport)
        await asyncio.get_running_loop().sock_sendall(slow, masked_frame(CONSUME.encode()))
        await until(lambda: "foo" in queues.topics and len(queues.topics["foo"].consumers) == 1)

        # A protocol client pushes N x 1 KiB through the default entry script into "foo".
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, buffered_bytes(proto.transport))
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        producer = await websockets.connect(running.client_url)
        for i in range(N):
            await producer.send(f"m{i:05d}" + "x" * PAYLOAD)
        await until(lambda: queues.delivered + queues.length("foo") == N, timeout=20)
        await asyncio.sleep(0.5)  # several dispatch retries (every 50 ms) while nobody reads
        sampler.cancel()
        peak = max(peak, buffered_bytes(proto.transport))

        # Backpressure: the engine stopped feeding it; the rest waits in the topic.
        taken = queues.delivered
        waiting = queues.length("foo")
        assert waiting == N - taken
        assert taken < N // 4, f"{taken} of {N} events were written to a consumer that never reads"
        assert waiting > N // 2
        event_size = 2 * PAYLOAD  # an event is ~1.3 KiB (payload, headers in ctx, envelope)
        assert CONSUMER_BUFFER_LIMIT - event_size <= peak <= CONSUMER_BUFFER_LIMIT + event_size, peak
        assert peak < N * PAYLOAD // 4
        assert proto in factory.open_protocols and not proto._slow  # backpressure is not a close

        # A well-behaved consumer gets every waiting message, in order, exactly once.
        good = await consumer(running.api_url)
        received: list[int] = []
        while len(received) < waiting:
            number = event_index(await asyncio.wait_for(good.recv(), 5))
            if number is not None:
                received.append(number)
        assert received == list(range(taken, N))
        assert queues.length("foo") == 0 and queues.delivered == N

        # Now the slow consumer's replies overflow maxWriteBuffer: close 4008.
        with LogCapture() as logs:
            sent = await flood_pings(slow, proto, factory, id_size=16000, limit=2000)
            assert proto._slow, f"not closed after {sent} pings"
            code = await close_code_on_wire(slow)
            await until(lambda: proto not in factory.open_protocols, timeout=3)
        lines = logs.find("close slow api connection ")
        assert len(lines) == 1, logs.lines
        buffered = int(lines[0].rsplit("buffered=", 1)[1])
        assert cap < buffered <= cap + 17000  # over the cap by at most one reply
        assert code == 4008
        assert len(queues.topics["foo"].consumers) == 1  # it no longer consumes
        metrics = await http_request(running.api_port, "GET", "/metrics")
        assert slow_count(metrics.body, "api") == 1

        # The engine keeps serving: pings, and new messages reach the remaining consumer.
        await ping(good)
        await producer.send(f"m{N:05d}" + "y")
        number = None
        while number is None:
            number = event_index(await asyncio.wait_for(good.recv(), 5))
        assert number == N
    finally:
        slow.close()
        for ws in (good, producer):
            if ws is not None:
                await ws.close()
        await running.stop()


@in_asyncio
async def test_api_client_that_never_reads_its_replies_is_closed_4008_at_a_low_cap() -> None:
    cap = 65536  # the smallest engine.apiServer.maxWriteBuffer the schema allows
    running = await start_engine(api_config(max_write_buffer=cap))
    factory = running.service.engine.api_factory
    slow = await raw_handshake(running.api_port, "/ws/v1")
    try:
        async with websockets.connect(running.api_url, ping_interval=None) as good:
            await until(lambda: len(factory.open_protocols) == 2)
            (proto,) = [p for p in factory.open_protocols if p.peer_text.endswith(f":{slow.getsockname()[1]}")]
            small_send_buffer(proto.transport)
            with LogCapture() as logs:
                sent = await flood_pings(slow, proto, factory, id_size=2000, limit=5000)
                assert proto._slow, f"not closed after {sent} pings"
                await ping(good, "during")  # served while the slow one closes
                code = await close_code_on_wire(slow)
                await until(lambda: proto not in factory.open_protocols, timeout=3)
            lines = logs.find(f"close slow api connection {proto.peer_text} buffered=")
            assert len(lines) == 1, logs.lines
            buffered = int(lines[0].rsplit("buffered=", 1)[1])
            assert cap < buffered <= cap + 2100
            assert code == 4008
            assert factory.open_protocols and proto not in factory.open_protocols
            await ping(good, "after")
            metrics = await http_request(running.api_port, "GET", "/metrics")
            assert slow_count(metrics.body, "api") == 1
    finally:
        slow.close()
        await running.stop()


# A protocol client that stops reading, among fast subscribers of a channel ------------------


@in_asyncio
async def test_publish_fan_out_cuts_off_the_slow_subscriber_and_keeps_reaching_the_fast_ones() -> None:
    cap = 65536
    running = await start_engine(loopback_config(max_write_buffer=cap))
    engine = running.service.engine
    slow = await raw_handshake(engine.protocol_listeners[0].actual_port)
    fast: list[Any] = []
    readers: list[asyncio.Future] = []
    try:
        await until(lambda: len(engine.connections.by_id) == 1)
        (slow_id,) = engine.connections.by_id
        slow_conn = engine.connections.by_id[slow_id]
        small_send_buffer(slow_conn.transport)
        for _ in range(3):
            fast.append(await websockets.connect(running.client_url, max_queue=None, ping_interval=None))
        await until(lambda: len(engine.connections.by_id) == 4)

        async with websockets.connect(running.api_url, max_queue=None, ping_interval=None) as api:
            async def request(method: str, params: dict, request_id: int) -> Any:
                await api.send(json.dumps({"method": method, "params": [params], "id": request_id}))
                reply = json.loads(await asyncio.wait_for(api.recv(), 5))
                assert reply["id"] == request_id
                return reply

            for i, client_id in enumerate(engine.connections.by_id):
                reply = await request("conn.call", {"client_id": str(client_id), "func": "subscribe",
                                                    "args": ["room"]}, i)
                assert reply["error"] is None, reply

            got: list[list[int]] = [[] for _ in fast]

            async def read(ws: Any, into: list[int]) -> None:
                async for message in ws:
                    into.append(int(message[:5]))

            readers = [asyncio.ensure_future(read(ws, into)) for ws, into in zip(fast, got)]

            chunk = 8000
            results: list[dict] = []
            peak = 0
            with LogCapture() as logs:
                for i in range(200):  # 1.6 MB: far more than the cap and the kernel buffers
                    reply = await request("mesh.publish", {"channel": "room", "data": f"{i:05d}" + "z" * chunk}, 100 + i)
                    assert reply["error"] is None, reply
                    results.append(reply["result"])
                    if slow_conn.transport.transport is not None:
                        peak = max(peak, buffered_bytes(slow_conn.transport.transport))
                    if i % 10 == 9:
                        await asyncio.sleep(0.01)  # let the fast subscribers read
                await until(lambda: slow_id not in engine.connections.by_id, timeout=3)
                # Once it is gone (aborted 1 s after its unanswered close), it is not counted.
                reply = await request("mesh.publish", {"channel": "room", "data": "00200"}, 300)
                assert reply["result"] == {"fail": 0, "success": True, "total": 3}
                await until(lambda: all(len(g) == 201 for g in got), timeout=10)

            # The fast subscribers got every message, in order; every publish reached them.
            assert all(g == list(range(201)) for g in got)
            assert all(r["success"] is True for r in results)
            # The slow one: counted in total/fail once it overflowed, then gone from the channel.
            first_fail = next(i for i, r in enumerate(results) if r["fail"])
            assert 0 < first_fail < 150, results
            assert all(r == {"fail": 0, "success": True, "total": 4} for r in results[:first_fail])
            assert results[first_fail] == {"fail": 1, "success": True, "total": 4}
            assert all(r["total"] - r["fail"] == 3 for r in results[first_fail:]), results[first_fail:]  # the fast ones
            assert peak <= cap + chunk + 16, peak  # bounded: the cap plus the overflowing frame
            assert logs.find(f"close slow client {slow_id} buffered=")
            assert logs.find(f"client {slow_id} closed: slow consumer")
            metrics = await http_request(running.api_port, "GET", "/metrics")
            assert slow_count(metrics.body, "client") == 1
    finally:
        for task in readers:
            task.cancel()
        slow.close()
        for ws in fast:
            await ws.close()
        await running.stop()
