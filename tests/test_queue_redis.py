"""The ``redis`` queue backend against a real redis-server (docs/queues.md).

The server comes from ``CONNMIX_TEST_REDIS`` (``.ci/run`` starts one), else a redis-server
started here on a free loopback port; the tests skip, saying why, only when there is neither.
Each test uses its own key prefix, so they share the server without seeing each other's streams.
Tests that stop Redis start their own private redis-server and stop it by its pid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import websockets
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from conftest import in_asyncio, loopback_config, start_engine, wait_for
from connmix_tx.config import HostPort, RedisConfig
from connmix_tx.engine.queue import QueueError
from connmix_tx.engine.queue_redis import RedisQueueManager
from redisservers import RedisServer

SEED_CONSUME = '{"method":"queue.consume","params":["foo"],"id":12345}'


def redis_config(address: HostPort) -> RedisConfig:
    return RedisConfig(name="default", addr=address, password="", db=0, pool_size=4, min_idle_conns=0,
                       max_conn_age=0, idle_timeout=300)


def redis_engine_config(address: HostPort, prefix: str, **queue: Any) -> Any:
    config = loopback_config()
    luavm = config.engine.luavm
    luavm = dataclasses.replace(
        luavm,
        queue=dataclasses.replace(luavm.queue, backend="redis", prefix=prefix, **queue),
        redis=(redis_config(address),),
    )
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, luavm=luavm))


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def recv_json(ws: Any, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def started(config: Any) -> Any:
    running = await start_engine(config)
    await until(lambda: running.service.engine.queues.up)
    return running


class Logs:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        from twisted.logger import formatEvent

        self.lines.append(formatEvent(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def logs() -> Iterator[Logs]:
    capture = Logs()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


# The seed walkthrough, unchanged, on the redis backend ----------------------------------------


@in_asyncio
async def test_seed_walkthrough_on_the_redis_backend(redis_address: HostPort) -> None:
    running = await started(redis_engine_config(redis_address, new_prefix()))
    try:
        async with websockets.connect(running.client_url) as client, \
                websockets.connect(running.api_url) as api:
            await client.send("test")
            await asyncio.sleep(0.05)
            await api.send(SEED_CONSUME)
            assert await recv_json(api) == {"error": None, "result": {"success": True}, "id": 12345}
            event = await recv_json(api)
            assert event["event"] == "queue.consume" and event["id"] is None
            result = event["result"]
            assert set(result) == {"client_id", "node_id", "queue", "data"}  # auto-ack: no id
            assert result["queue"] == "foo"
            assert result["data"]["msg"] == {"data": "test", "finish": True, "type": "text"}
            send = {"client_id": result["client_id"], "data": "hello, world!"}
            await api.send(json.dumps({"method": "mesh.send", "params": [send], "id": 12345}))
            assert await recv_json(api) == {
                "error": None, "result": {"fail": 0, "success": True, "total": 1}, "id": 12345}
            assert await asyncio.wait_for(client.recv(), 5) == "hello, world!"
            await client.send("again")
            assert (await recv_json(api))["result"]["data"]["msg"]["data"] == "again"
            # Auto-ack: both entries left the stream once written.
            queues = running.service.engine.queues
            length = await wait_for(queues.link.command([b"XLEN", queues._key("foo")]))
            assert length == 0
    finally:
        await running.stop()


# Pushes -----------------------------------------------------------------------------------------


@in_asyncio
async def test_push_full_and_never_trimmed(redis_address: HostPort, logs: Logs) -> None:
    running = await started(redis_engine_config(redis_address, new_prefix(), topic_size=2))
    try:
        async with websockets.connect(running.client_url) as client:
            for text in ("one", "two", "three"):
                await client.send(text)
            await until(lambda: logs.matching("queue push failed: queue full"))
        async with websockets.connect(running.api_url) as api:
            await api.send(SEED_CONSUME)
            await recv_json(api)
            got = [(await recv_json(api))["result"]["data"]["msg"]["data"] for _ in range(2)]
            assert got == ["one", "two"]  # the oldest kept, the refused one never stored
            with pytest.raises(asyncio.TimeoutError):
                await recv_json(api, timeout=0.5)
        text = await metrics_text(running)
        assert 'connmix_engine_queue_push_total{result="full",topic="foo"} 1.0' in text
        assert "connmix_engine_queue_backend_up 1.0" in text
    finally:
        await running.stop()


async def metrics_text(running: Any) -> str:
    from connmix_tx.testing import metrics_text

    return metrics_text(running.service.engine.metrics)


# Manual ack, redelivery ---------------------------------------------------------------------------


@in_asyncio
async def test_manual_ack_and_redelivery_after_disconnect(redis_address: HostPort) -> None:
    running = await started(redis_engine_config(redis_address, new_prefix()))
    manual = {"method": "queue.consume", "params": [{"queues": ["foo"], "ack": "manual"}], "id": 1}
    client = await websockets.connect(running.client_url)  # open: its callbacks run in order
    try:
        for text in ("a", "b", "c"):
            await client.send(text)
        async with websockets.connect(running.api_url) as first:
            await first.send(json.dumps(manual))
            await recv_json(first)
            events = [(await recv_json(first))["result"] for _ in range(3)]
            assert [e["data"]["msg"]["data"] for e in events] == ["a", "b", "c"]
            assert all("redelivered" not in e and e["message_id"] for e in events)
            await first.send(json.dumps({"method": "queue.ack", "params": [
                {"queue": "foo", "ids": [events[1]["message_id"], "0-1"]}], "id": 2}))
            assert await recv_json(first) == {"error": None, "result": {"acked": 1, "success": True}, "id": 2}
        # The connection closed with a and c unacknowledged: the next consumer gets them first.
        async with websockets.connect(running.api_url) as second:
            await second.send(json.dumps({"m": "queue.pop", "p": {"t": ["foo"], "a": "manual"}, "i": 1}))
            await recv_json(second)
            again = [(await recv_json(second))["p"] for _ in range(2)]
            assert [e["d"]["msg"]["data"] for e in again] == ["a", "c"]
            assert [e["r"] for e in again] == [1, 1]
            assert [e["i"] for e in again] == [events[0]["message_id"], events[2]["message_id"]]
            assert 'connmix_engine_queue_unacked{topic="foo"} 2.0' in await metrics_text(running)
            await second.send(json.dumps({"m": "queue.ack", "p": {"t": "foo", "i": [e["i"] for e in again]}, "i": 2}))
            assert await recv_json(second) == {"E": None, "r": {"n": 2, "s": True}, "i": 2}
            queues = running.service.engine.queues
            await until(lambda: queues.unacked == 0)
            length = await wait_for(queues.link.command([b"XLEN", queues._key("foo")]))
            assert length == 0
        text = await metrics_text(running)
        assert 'connmix_engine_queue_acks_total{topic="foo"} 3.0' in text
        assert 'connmix_engine_queue_redeliveries_total{topic="foo"} 2.0' in text
    finally:
        await client.close()
        await running.stop()


# Two engines on one Redis -------------------------------------------------------------------------


@in_asyncio
async def test_pushed_on_one_engine_consumed_through_another(redis_address: HostPort) -> None:
    prefix = new_prefix()
    one = await started(redis_engine_config(redis_address, prefix))
    two = await started(redis_engine_config(redis_address, prefix))
    try:
        async with websockets.connect(two.api_url) as api:
            await api.send(SEED_CONSUME)
            await recv_json(api)
            async with websockets.connect(one.client_url) as client:
                for i in range(5):
                    await client.send(f"m{i}")
                got = [(await recv_json(api))["result"] for _ in range(5)]
            assert [g["data"]["msg"]["data"] for g in got] == [f"m{i}" for i in range(5)]
            assert got[0]["client_id"].isdigit()
    finally:
        await one.stop()
        await two.stop()


class Consumer:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, str | None, int]] = []

    def eligible(self) -> bool:
        return True

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        self.got.append((data, message_id, redelivered))


async def settled(d: Deferred) -> Any:
    return await wait_for(d)


@in_asyncio
async def test_unacked_messages_of_a_dead_engine_are_claimed_and_redelivered(redis_address: HostPort) -> None:
    from twisted.internet import reactor

    prefix = new_prefix()
    dead = RedisQueueManager(reactor, redis_config(redis_address), "dead-engine", prefix=prefix,
                             ack_timeout=0.5)
    alive = RedisQueueManager(reactor, redis_config(redis_address), "alive-engine", prefix=prefix,
                              ack_timeout=0.5)
    dead.start()
    alive.start()
    try:
        await until(lambda: dead.up and alive.up)
        held = Consumer()
        dead.consume(held, ["jobs"], manual=True)
        for i in range(3):
            assert await settled(dead.push("jobs", "1", b'"job%d"' % i)) is True
        await until(lambda: len(held.got) == 3)
        dead.stop()  # gone without acknowledging: as after SIGKILL, the entries stay pending
        other = Consumer()
        alive.consume(other, ["jobs"], manual=True)
        await until(lambda: len(other.got) == 3)
        assert [(d, i, r) for d, i, r in other.got] == [(d, i, 1) for d, i, _ in held.got]
        assert alive.ack(other, "jobs", [i for _, i, _ in other.got]) == 3
    finally:
        dead.stop()
        alive.stop()


@in_asyncio
async def test_push_refusals_are_clear(redis_address: HostPort) -> None:
    from twisted.internet import reactor

    queues = RedisQueueManager(reactor, redis_config(redis_address), "x", prefix=new_prefix(), topic_size=1)
    with pytest.raises(QueueError, match="queue unavailable"):
        await settled(queues.push("foo", "", b"1"))  # not started: not connected
    queues.start()
    try:
        await until(lambda: queues.up)
        with pytest.raises(QueueError, match="invalid topic"):
            await settled(queues.push("bad topic", "", b"1"))
        assert await settled(queues.push("foo", "", b"1")) is True
        with pytest.raises(QueueError, match="queue full"):
            await settled(queues.push("foo", "", b"2"))
        # maxTopics (100 by default) does not apply: Redis holds the topics.
        queues.consume(Consumer(), [f"t{i}" for i in range(150)])
        assert len(queues.topics) >= 150
    finally:
        queues.stop()


# Redis going away and back ----------------------------------------------------------------------------


@in_asyncio
async def test_redis_restart_is_survived(tmp_path: Path, logs: Logs) -> None:
    server = RedisServer(tmp_path)
    server.start()
    running = None
    try:
        running = await started(redis_engine_config(server.address, new_prefix()))
        queues = running.service.engine.queues
        async with websockets.connect(running.api_url) as api, \
                websockets.connect(running.client_url) as client:
            await api.send(SEED_CONSUME)
            await recv_json(api)
            await client.send("before")
            assert (await recv_json(api))["result"]["data"]["msg"]["data"] == "before"

            server.stop()
            await until(lambda: not queues.up)
            await client.send("during")
            await until(lambda: logs.matching("queue push failed: queue unavailable"))
            assert "connmix_engine_queue_backend_up 0.0" in await metrics_text(running)
            await asyncio.sleep(1.5)  # a reconnect attempt or two fail: still logged once
            assert len(logs.matching(f"queue backend redis {server.address} down")) == 1

            server.start()
            await until(lambda: queues.up, timeout=15)
            assert len(logs.matching(f"queue backend redis {server.address} up")) == 2  # start, back
            await client.send("after")
            event = await recv_json(api, timeout=10)  # the consumption resumed by itself
            assert event["result"]["data"]["msg"]["data"] == "after"
        text = await metrics_text(running)
        assert 'connmix_engine_queue_push_total{result="error",topic="foo"} 1.0' in text
    finally:
        if running is not None:
            await running.stop()
        server.stop()


# A real engine process killed with SIGKILL ---------------------------------------------------------


def redis_call(address: HostPort, *args: bytes) -> Any:
    """One command on a fresh socket (test-side checks, independent of the engine's client)."""
    import hiredis

    reader = hiredis.Reader()
    with socket.create_connection((address.host, address.port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        while True:
            reader.feed(s.recv(65536))
            reply = reader.gets()
            if reply is not False:
                return reply


def engine_process(folder: Path, address: HostPort, prefix: str, ports: list[int]) -> Any:
    from procs import Process, twistd, write_yaml

    registry, center_api, mesh, api, client = ports
    repo = Path(__file__).resolve().parent.parent
    config = write_yaml(folder / "engine.yaml", {
        "center": {"registry": {"bind": "127.0.0.1", "port": registry},
                   "apiServer": {"bind": "127.0.0.1", "port": center_api}},
        "engine": {
            "centerRegistry": f"127.0.0.1:{registry}",
            "meshPoint": {"bind": "127.0.0.1", "port": mesh},
            "apiServer": {"bind": "127.0.0.1", "port": api},
            "servers": [{"bind": "127.0.0.1", "port": client,
                         "entry": str(repo / "lua" / "entry.websocket.lua")}],
            "luavm": {"queue": {"backend": "redis", "prefix": prefix, "ackTimeout": 1},
                      "redis": [{"name": "default", "addr": str(address)}]},
        },
    })
    process = Process(twistd("--dev", "-f", str(config)), folder)
    try:
        process.wait_for_line(r"start the protocol server")
        process.wait_for_line(r"queue backend redis .* up", new=False)
    except BaseException:
        process.kill()
        raise
    return process


def consume_all(api_port: int, count: int, params: Any) -> list[dict]:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{api_port}/ws/v1") as api:
        api.send(json.dumps({"method": "queue.consume", "params": params, "id": 1}))
        assert json.loads(api.recv(timeout=10))["result"] == {"success": True}
        return [json.loads(api.recv(timeout=15))["result"] for _ in range(count)]


def test_sigkill_loses_no_waiting_and_no_unacked_message(tmp_path: Path, redis_address: HostPort) -> None:
    from websockets.sync.client import connect

    from procs import free_ports

    prefix = new_prefix()
    key = f"{prefix}foo".encode()
    ports = free_ports(5)
    process = engine_process(tmp_path, redis_address, prefix, ports)
    try:
        with connect(f"ws://127.0.0.1:{ports[4]}/") as client:
            for i in range(50):
                client.send(f"m{i}")
            deadline = time.monotonic() + 15
            while redis_call(redis_address, b"XLEN", key) < 50:
                assert time.monotonic() < deadline, "the 50 pushes were not stored"
                time.sleep(0.05)
        process.kill()  # SIGKILL while the 50 messages wait

        process = engine_process(tmp_path, redis_address, prefix, ports)
        manual = [{"queues": ["foo"], "ack": "manual"}]
        events = consume_all(ports[3], 50, manual)
        assert [e["data"]["msg"]["data"] for e in events] == [f"m{i}" for i in range(50)]
        assert all("redelivered" not in e for e in events)
        process.kill()  # SIGKILL again, with the 50 delivered and none acknowledged

        process = engine_process(tmp_path, redis_address, prefix, ports)
        again = consume_all(ports[3], 50, ["foo"])  # claimed after ackTimeout (1 s), auto-ack
        assert [e["data"]["msg"]["data"] for e in again] == [f"m{i}" for i in range(50)]
        deadline = time.monotonic() + 10
        while redis_call(redis_address, b"XLEN", key) != 0:  # auto-acked: gone from the stream
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.stop()


# mix.queue.push as a script sees it ------------------------------------------------------------------

PUSHER = r"""
function on_handshake(client_id, headers, server) end
function on_message(msg)
  local ok, err = mix.queue.push("foo", msg.data)
  mix.websocket():send(tostring(ok) .. " " .. tostring(err))
end
function on_close(client_id, err) end
"""


@in_asyncio
async def test_lua_push_returns_true_full_and_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    entry = tmp_path / "pusher.lua"
    entry.write_text(PUSHER)
    config = redis_engine_config(server.address, new_prefix(), topic_size=1)
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, servers=(dataclasses.replace(config.engine.servers[0], entry=str(entry)),)))
    running = None
    try:
        running = await started(config)
        async with websockets.connect(running.client_url) as client:
            await client.send("one")
            assert await asyncio.wait_for(client.recv(), 5) == "true nil"
            await client.send("two")
            assert await asyncio.wait_for(client.recv(), 5) == "nil queue full"
            server.stop()
            await until(lambda: not running.service.engine.queues.up)
            await client.send("three")
            assert await asyncio.wait_for(client.recv(), 5) == "nil queue unavailable"
    finally:
        if running is not None:
            await running.stop()
        server.stop()


@in_asyncio
async def test_redis_that_does_not_answer_fails_pushes_within_2_s(tmp_path: Path) -> None:
    import signal

    from twisted.internet import reactor

    server = RedisServer(tmp_path)
    server.start()
    queues = RedisQueueManager(reactor, redis_config(server.address), "x", prefix=new_prefix())
    queues.start()
    try:
        await until(lambda: queues.up)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # alive, connected, silent
        with pytest.raises(QueueError, match="queue unavailable"):
            await settled(queues.push("foo", "", b"1"))  # settled() waits at most 5 s
        assert not queues.up
        os.kill(server.process.pid, signal.SIGCONT)
        await until(lambda: queues.up, timeout=15)
        assert await settled(queues.push("foo", "", b"2")) is True
    finally:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        queues.stop()
        server.stop()


def test_push_cannot_wait_in_a_framing_callback_on_the_redis_backend(tmp_path: Path) -> None:
    from luahelpers import make_engine

    from connmix_tx.lua.runtime import ScriptError

    source = """
        function on_connect() end
        function on_close() end
        function on_message() end
        function protocol_input(buf) return 0 end
        function protocol_decode(s) return mix.queue.push("foo", s) end
        function protocol_encode(s) return s end
    """
    engine = make_engine(tmp_path, source, kind="socket", stubs=False, load=False)
    queues = RedisQueueManager(engine.clock, redis_config(HostPort("127.0.0.1", 9)), "x")  # never started
    engine.library.queues = queues
    engine.script.load()
    with pytest.raises(ScriptError, match="cannot wait in protocol_"):
        engine.script.call_protocol("protocol_decode", b"1", b"x")
    assert queues.link._outbox == []  # refused before anything was sent
