"""The client SDK (connmix_tx.client): plain routing and bookkeeping without sockets, then the real
thing against an in-process engine (consume, send, publish, calls, credentials, reconnect after a
restart), a real two-engine cluster (discovery, routing) and the chat back-end example.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import websockets
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from clusterprocs import Cluster, running_cluster
from conftest import REPO, in_asyncio, loopback_config, start_engine, wait_for, with_users
from connmix_tx.client import (
    Client, ConnmixError, EngineUnavailable, Event, PendingRequests, QueueMessage, Reply, RoutingTable,
    close_reason, connect_api, engine_url, parse_frame,
)
from connmix_tx.config import Config
from connmix_tx.ids import Snowflake


def client_id(number: int, sequence: int = 0) -> str:
    return str(Snowflake(number, now_ms=lambda: 1_700_000_000_000 + sequence).next_id())


def failure_of(deferred: Any) -> BaseException:
    failures: list = []
    deferred.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0].value


def result_of(deferred: Any) -> Any:
    results: list = []
    deferred.addBoth(results.append)
    assert results, "the Deferred did not fire"
    return results[0]


# --------------------------------------------------------------------------- frames and requests


def test_parse_frame_tells_replies_from_events() -> None:
    assert parse_frame(b'{"error":null,"result":{"success":true},"id":3}') == Reply(3, {"success": True}, None)
    assert parse_frame('{"error":{"code":202,"message":"dup"},"id":4}') == Reply(4, None, {"code": 202, "message": "dup"})
    event = parse_frame('{"event":"queue.consume","result":{"queue":"foo"},"id":null}')
    assert event == Event("queue.consume", {"queue": "foo"})
    for bad in (b"[1]", b"not json", b'{"id":1}', b'{"error":"x","id":1}'):
        with pytest.raises(ValueError):
            parse_frame(bad)


def test_requests_are_numbered_and_settled_by_id() -> None:
    book = PendingRequests()
    frame1, first = book.open("server.ping", [])
    frame2, second = book.open("mesh.send", [{"client_id": "1", "data": "x"}])
    assert json.loads(frame1) == {"method": "server.ping", "params": [], "id": 1}
    assert json.loads(frame2)["id"] == 2 and len(book) == 2
    # Replies are matched by id, whatever their order.
    assert book.settle(Reply(2, None, {"code": 401, "message": "send failed: client not found"}))
    error = failure_of(second)
    assert isinstance(error, ConnmixError) and (error.code, error.message) == (401, "send failed: client not found")
    assert str(error) == "error 401: send failed: client not found"
    assert book.settle(Reply(1, {"status": "server.pong"}, None))
    assert result_of(first) == {"status": "server.pong"}
    assert len(book) == 0
    assert not book.settle(Reply(1, {}, None))  # already answered
    assert not book.settle(Reply(None, None, {"code": -32700, "message": "parse error"}))


def test_connection_loss_fails_every_waiting_request() -> None:
    book = PendingRequests()
    waiting = [book.open("server.ping", [])[1] for _ in range(3)]
    book.fail_all(EngineUnavailable("engine x: connection lost"))
    assert [type(failure_of(d)) for d in waiting] == [EngineUnavailable] * 3
    assert len(book) == 0


def test_a_timed_out_request_is_forgotten_and_its_late_reply_ignored() -> None:
    book, clock = PendingRequests(), Clock()
    _, waiting = book.open("server.ping", [])
    waiting.addTimeout(5, clock)
    clock.advance(5)
    assert isinstance(failure_of(waiting), DeferredTimeout)
    assert len(book) == 0
    assert not book.settle(Reply(1, {"status": "server.pong"}, None))


def test_close_reasons_are_short() -> None:
    refused = 'connection was closed uncleanly ("WebSocket connection upgrade failed [401]: Unauthorized")'
    assert close_reason(refused, 1006) == "handshake refused: HTTP 401 Unauthorized"
    assert close_reason("server stopping", 1001) == "server stopping"
    assert close_reason(None, 1000) == "closed with code 1000"
    assert close_reason(None, None) == "connection lost"


# --------------------------------------------------------------------------- routing


def test_routing_by_the_node_bits_of_the_client_id() -> None:
    routes = RoutingTable()
    routes.replace({0: "a:6789", 1: "b:6789"})
    assert routes.owner(client_id(1)) == "b:6789"
    assert routes.owner(int(client_id(0))) == "a:6789"  # integers too
    assert routes.route(client_id(1), ["a:6789", "b:6789"]) == "b:6789"
    # Owner not connected, unknown number, invalid id: any connected engine (it forwards).
    assert routes.route(client_id(1), ["a:6789"]) == "a:6789"
    assert routes.route(client_id(5), ["b:6789", "a:6789"]) == "b:6789"
    assert routes.route("not-an-id", ["a:6789"]) == "a:6789"
    assert routes.route(client_id(1), []) is None


def test_routing_learns_every_number_of_an_engine() -> None:
    routes = RoutingTable()
    routes.learn(3, "a:6789")
    assert routes.owner(client_id(3)) == "a:6789"
    routes.learn(4, "a:6789")  # another worker of the engine at that address
    assert routes.owner(client_id(3)) == "a:6789" and routes.owner(client_id(4)) == "a:6789"
    routes.learn(4, "b:6789")  # the number now names another engine
    assert routes.owner(client_id(4)) == "b:6789" and routes.owner(client_id(3)) == "a:6789"
    routes.replace({5: "b:6789"})  # the center's list starts afresh
    assert routes.owner(client_id(3)) is None and routes.owner(client_id(5)) == "b:6789"


def test_engine_urls() -> None:
    assert engine_url("127.0.0.1:6789") == "ws://127.0.0.1:6789/ws/v1"
    assert engine_url("10.0.0.2:6789", "wss") == "wss://10.0.0.2:6789/ws/v1"
    assert engine_url("ws://h:1") == "ws://h:1/ws/v1"
    assert engine_url("ws://h:1/ws/v1") == "ws://h:1/ws/v1"
    assert engine_url("::1:6789") == "ws://[::1]:6789/ws/v1"


class FakeConnection:
    """Stands in for an open ApiConnection: records requests, answers with ``answers[method]``."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.usable = True
        self.calls: list[tuple[str, list]] = []
        self.answers = answers or {}

    def call(self, method: str, params: Any = ()) -> Any:
        from twisted.internet.defer import fail, succeed

        self.calls.append((method, list(params)))
        answer = self.answers.get(method, {"success": True})
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)

    def sendClose(self, code: int, reason: str) -> None:
        self.usable = False


def fake_client(**answers: Any) -> tuple[Client, FakeConnection, FakeConnection]:
    client = Client(engines=["127.0.0.1:7001", "127.0.0.1:7002"], reactor=MemoryReactorClock())
    a, b = FakeConnection(answers), FakeConnection(answers)
    client.links["127.0.0.1:7001"].connection = a  # type: ignore[assignment]
    client.links["127.0.0.1:7002"].connection = b  # type: ignore[assignment]
    client.routes.replace({0: "127.0.0.1:7001", 1: "127.0.0.1:7002"})
    return client, a, b


def test_client_routes_send_and_calls_to_the_owner() -> None:
    client, a, b = fake_client()
    on_b = client_id(1)
    client.send(on_b, "hi")
    client.send(on_b, b"\x00\xff", binary=True)
    client.set_context_value(on_b, "user", 7)
    client.set_context(on_b, {"a": 1})
    client.subscribe(on_b, "r1", "r2")
    client.unsubscribe(on_b, "r1")
    client.close(on_b)
    assert a.calls == []
    assert b.calls == [
        ("mesh.send", [{"client_id": on_b, "data": "hi"}]),
        ("mesh.send", [{"client_id": on_b, "data": "AP8=", "type": "binary"}]),
        ("conn.call", [{"client_id": on_b, "func": "set_context_value", "args": ["user", 7]}]),
        ("conn.call", [{"client_id": on_b, "func": "set_context", "args": [{"a": 1}]}]),
        ("conn.call", [{"client_id": on_b, "func": "subscribe", "args": ["r1", "r2"]}]),
        ("conn.call", [{"client_id": on_b, "func": "unsubscribe", "args": ["r1"]}]),
        ("conn.call", [{"client_id": on_b, "func": "close", "args": []}]),
    ]
    assert client.route(client_id(0)).address == "127.0.0.1:7001"
    # The owner's connection is down: another engine takes it (and forwards over the mesh).
    b.usable = False
    client.send(on_b, "via a")
    assert a.calls == [("mesh.send", [{"client_id": on_b, "data": "via a"}])]
    a.usable = False
    assert isinstance(failure_of(client.send(on_b, "nowhere")), EngineUnavailable)


def test_publish_goes_to_one_engine_and_returns_its_counts() -> None:
    counts = {"fail": 0, "success": True, "total": 9}
    client, a, b = fake_client(**{"mesh.publish": counts})
    assert result_of(client.publish("room", "hello")) == counts
    assert result_of(client.publish("room", "again")) == counts
    assert len(a.calls) + len(b.calls) == 2  # one engine per publish, spread over the engines
    assert ("mesh.publish", [{"channel": "room", "data": "hello"}]) in a.calls + b.calls


def test_api_errors_come_back_as_connmix_errors() -> None:
    client, _, _ = fake_client(**{"mesh.send": ConnmixError(401, "send failed: client not found")})
    error = failure_of(client.send(client_id(0), "x"))
    assert isinstance(error, ConnmixError) and error.code == 401


def test_consume_on_every_engine_and_dispatch_by_topic() -> None:
    client, a, b = fake_client()
    seen: list[QueueMessage] = []
    assert result_of(client.consume(["foo", "bar"], seen.append)) == [{"success": True}] * 2
    assert a.calls == b.calls == [("queue.consume", ["foo", "bar"])]
    duplicate = failure_of(client.consume("foo", seen.append))
    assert isinstance(duplicate, ConnmixError) and duplicate.code == 202
    link = client.links["127.0.0.1:7002"]
    sender = client_id(1)
    client._event(link, Event("queue.consume", {"client_id": sender, "node_id": "n", "queue": "bar", "data": {"x": 1}}))
    assert seen == [QueueMessage(sender, "n", "bar", {"x": 1}, "127.0.0.1:7002")]


def test_numbers_are_learnt_from_events_without_a_center() -> None:
    client = Client(engines=["127.0.0.1:7001", "127.0.0.1:7002"], reactor=MemoryReactorClock())
    client.links["127.0.0.1:7001"].connection = FakeConnection()  # type: ignore[assignment]
    client.links["127.0.0.1:7002"].connection = FakeConnection()  # type: ignore[assignment]
    client.consume("foo", lambda message: None)
    on_second = client_id(6)
    assert client.route(on_second).address == "127.0.0.1:7001"  # unknown yet: the first engine
    client._event(client.links["127.0.0.1:7002"], Event("queue.consume", {"client_id": on_second, "queue": "foo"}))
    assert client.route(on_second).address == "127.0.0.1:7002"
    assert client.links["127.0.0.1:7002"].number == 6
    # The engine at 7002 has a second worker: an event of its client teaches that number too.
    on_other_worker = client_id(9)
    client._event(client.links["127.0.0.1:7002"], Event("queue.consume", {"client_id": on_other_worker, "queue": "foo"}))
    assert client.route(on_other_worker).address == "127.0.0.1:7002"
    assert client.route(on_second).address == "127.0.0.1:7002"  # the first worker's number is kept


def test_ready_times_out_naming_the_engine() -> None:
    reactor = MemoryReactorClock()
    client = Client(engines=["127.0.0.1:7001"], reactor=reactor)
    waiting = client.ready(timeout=3)
    reactor.advance(3)
    error = failure_of(waiting)
    assert isinstance(error, EngineUnavailable)
    assert str(error) == "engine 127.0.0.1:7001 unreachable: no answer within 3 s"


def test_ready_fails_fast_on_the_first_refusal() -> None:
    client = Client(engines=["127.0.0.1:7001"], reactor=MemoryReactorClock())
    waiting = client.ready(timeout=30, fail_fast=True)
    client._failed(client.links["127.0.0.1:7001"], "connection refused")
    assert str(failure_of(waiting)) == "engine 127.0.0.1:7001 unreachable: connection refused"


def test_a_client_needs_a_center_or_engines() -> None:
    with pytest.raises(ValueError):
        Client(reactor=MemoryReactorClock())
    with pytest.raises(ValueError):
        Client(center_url="http://c:6787", engines=["e:6789"], reactor=MemoryReactorClock())


# --------------------------------------------------------------------------- against a real engine


class Inbox:
    """Queue messages delivered to a consumer callback, awaited from asyncio."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[QueueMessage] = asyncio.Queue()

    def __call__(self, message: QueueMessage) -> None:
        self.queue.put_nowait(message)

    async def next(self, timeout: float = 5.0) -> QueueMessage:
        return await asyncio.wait_for(self.queue.get(), timeout)


def fast_client(**kwargs: Any) -> Client:
    from twisted.internet import reactor

    return Client(reactor=reactor, retry_policy=lambda attempt: 0.2, poll_interval=0.5, **kwargs)


@in_asyncio
async def test_consume_send_publish_and_calls_on_one_engine(engine: Any) -> None:
    client = fast_client(center_url=f"http://127.0.0.1:{engine.center_api_port}")
    client.start()
    try:
        links = await wait_for(client.ready())
        assert [(link.address, link.number) for link in links] == [(f"127.0.0.1:{engine.api_port}", 0)]
        inbox = Inbox()
        assert await wait_for(client.consume("foo", inbox)) == [{"success": True}]
        async with websockets.connect(engine.client_url) as ws:
            await ws.send("hello")
            message = await inbox.next()
            assert message.topic == "foo" and message.data["msg"]["data"] == "hello"
            assert len(message.node_id) == 20 and message.engine == links[0].address
            sender = message.client_id

            assert await wait_for(client.send(sender, "hi there")) == {"fail": 0, "success": True, "total": 1}
            assert await asyncio.wait_for(ws.recv(), 5) == "hi there"
            await wait_for(client.send(sender, b"\x00\x01", binary=True))
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01"

            assert await wait_for(client.set_context_value(sender, "user_id", 10000)) == {"success": True}
            assert await wait_for(client.set_context(sender, {"name": "ann"})) == {"success": True}
            await ws.send("with context")
            context = (await inbox.next()).data["ctx"]
            assert context["user_id"] == 10000 and context["name"] == "ann"

            assert await wait_for(client.subscribe(sender, "room", "other")) == {"success": True}
            assert await wait_for(client.publish("room", "to the room")) == {"fail": 0, "success": True, "total": 1}
            assert await asyncio.wait_for(ws.recv(), 5) == "to the room"
            await wait_for(client.unsubscribe(sender, "room"))
            assert (await wait_for(client.publish("room", "nobody")))["total"] == 0

            pongs = await wait_for(client.ping())
            assert list(pongs) == [links[0].address] and pongs[links[0].address] < 5

            with pytest.raises(ConnmixError) as error:
                await wait_for(client.send(client_id(0), "gone"))
            assert error.value.code == 401
            with pytest.raises(ConnmixError) as error:
                await wait_for(client.call(sender, "no_such_func"))
            assert error.value.code == 101

            await wait_for(client.close(sender))
            await asyncio.wait_for(ws.wait_closed(), 5)
    finally:
        await wait_for(client.stop())


@in_asyncio
async def test_one_api_connection_without_reconnection(engine: Any, free_port: Any) -> None:
    from twisted.internet import reactor

    events: asyncio.Queue[Event] = asyncio.Queue()
    conn = await wait_for(connect_api(reactor, engine.api_url, on_event=lambda c, e: events.put_nowait(e)))
    try:
        assert await wait_for(conn.call("server.ping")) == {"status": "server.pong"}
        assert await wait_for(conn.call("queue.consume", ["foo"])) == {"success": True}
        with pytest.raises(ConnmixError) as error:
            await wait_for(conn.call("queue.consume", ["foo"]))
        assert error.value.code == 202
        async with websockets.connect(engine.client_url) as ws:
            await ws.send("raw")
            event = await asyncio.wait_for(events.get(), 5)
        assert event.name == "queue.consume" and event.result["data"]["msg"]["data"] == "raw"
    finally:
        conn.sendClose(1000)
    port = free_port()
    with pytest.raises(EngineUnavailable, match=f"engine 127.0.0.1:{port} unreachable: connection refused"):
        await wait_for(connect_api(reactor, f"ws://127.0.0.1:{port}/ws/v1"))


@in_asyncio
async def test_credentials_go_to_the_center_and_the_engine() -> None:
    running = await start_engine(with_users(loopback_config()))
    center = f"http://127.0.0.1:{running.center_api_port}"
    try:
        anonymous = fast_client(center_url=center)
        anonymous.start()
        with pytest.raises(EngineUnavailable, match="HTTP 401"):
            await wait_for(anonymous.ready(fail_fast=True))
        await wait_for(anonymous.stop())

        # The center is asked with credentials, the engine without: its handshake is refused.
        wrong = fast_client(engines=[running.api_url], credentials=("alice", "nope"))
        wrong.start()
        with pytest.raises(EngineUnavailable, match="401"):
            await wait_for(wrong.ready(fail_fast=True))
        await wait_for(wrong.stop())

        client = fast_client(center_url=center, credentials=("alice", "s3cret"))
        client.start()
        try:
            await wait_for(client.ready(fail_fast=True))
            assert list((await wait_for(client.ping())).values())[0] < 5
            inbox = Inbox()
            await wait_for(client.consume("foo", inbox))
            async with websockets.connect(running.client_url) as ws:
                await ws.send("authenticated")
                message = await inbox.next()
                await wait_for(client.send(message.client_id, "ok"))
                assert await asyncio.wait_for(ws.recv(), 5) == "ok"
        finally:
            await wait_for(client.stop())
    finally:
        await running.stop()


def on_api_port(config: Config, port: int) -> Config:
    engine = dataclasses.replace(config.engine, api_server=dataclasses.replace(config.engine.api_server, port=port))
    return dataclasses.replace(config, engine=engine)


@in_asyncio
async def test_reconnect_and_consume_again_after_the_engine_restarts() -> None:
    first = await start_engine(loopback_config())
    api_port = first.api_port
    changes: list[tuple[str, bool]] = []
    client = fast_client(engines=[first.api_url], on_engine=lambda link, up, reason: changes.append((link.address, up)))
    client.start()
    try:
        await wait_for(client.ready())
        inbox = Inbox()
        await wait_for(client.consume("foo", inbox))
        async with websockets.connect(first.client_url) as ws:
            await ws.send("before")
            assert (await inbox.next()).data["msg"]["data"] == "before"

        await first.stop()
        with pytest.raises(EngineUnavailable):
            await wait_for(client.ping())

        second = await start_engine(on_api_port(loopback_config(), api_port))
        try:
            assert second.api_port == api_port
            async with websockets.connect(second.client_url) as ws:
                # Pushed before or after the client is back: it waits in the queue either way.
                await ws.send("after")
                message = await inbox.next(timeout=10)
                assert message.data["msg"]["data"] == "after"
                await wait_for(client.send(message.client_id, "welcome back"))
                assert await asyncio.wait_for(ws.recv(), 5) == "welcome back"
            address = f"127.0.0.1:{api_port}"
            assert changes == [(address, True), (address, False), (address, True)]
        finally:
            await second.stop()
    finally:
        await wait_for(client.stop())


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture
def two_engines(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as running:
        yield running


@in_asyncio
async def test_cluster_discovery_consumption_and_routing(two_engines: Cluster) -> None:
    cluster = two_engines
    client = fast_client(center_url=f"http://127.0.0.1:{cluster.center_api}")
    client.start()
    try:
        links = await wait_for(client.ready(), timeout=10)
        address = {name: f"127.0.0.1:{cluster.engines[name]['api']}" for name in "ab"}
        assert sorted(link.address for link in links) == sorted(address.values())
        assert sorted(link.number for link in links) == [0, 1]
        inbox = Inbox()
        await wait_for(client.consume("foo", inbox))

        async with websockets.connect(cluster.client_url("a")) as on_a, \
                websockets.connect(cluster.client_url("b")) as on_b:
            # Messages pushed on each engine reach the one consumer through that engine's link.
            await on_a.send("from a")
            await on_b.send("from b")
            got = {m.data["msg"]["data"]: m for m in [await inbox.next(), await inbox.next()]}
            id_a, id_b = got["from a"].client_id, got["from b"].client_id
            assert got["from a"].engine == address["a"] and got["from b"].engine == address["b"]
            assert got["from a"].node_id != got["from b"].node_id

            # send and conn.call go to the engine that holds the client.
            assert client.route(id_a).address == address["a"]
            assert client.route(id_b).address == address["b"]
            before = {link.address: link.requests for link in links}
            await wait_for(client.send(id_a, "to a"))
            await wait_for(client.send(id_b, "to b"))
            await wait_for(client.set_context_value(id_b, "user", 7))
            after = {link.address: link.requests for link in links}
            assert after[address["a"]] - before[address["a"]] == 1
            assert after[address["b"]] - before[address["b"]] == 2
            assert await asyncio.wait_for(on_a.recv(), 5) == "to a"
            assert await asyncio.wait_for(on_b.recv(), 5) == "to b"
            await on_b.send("context?")
            assert (await inbox.next()).data["ctx"]["user"] == 7

            # A publish through any one engine reaches subscribers on both.
            await wait_for(client.subscribe(id_a, "room"))
            await wait_for(client.subscribe(id_b, "room"))
            assert await wait_for(client.publish("room", "everyone")) == {"fail": 0, "success": True, "total": 2}
            assert await asyncio.wait_for(on_a.recv(), 5) == "everyone"
            assert await asyncio.wait_for(on_b.recv(), 5) == "everyone"
    finally:
        await wait_for(client.stop())


# --------------------------------------------------------------------------- the documented example


@in_asyncio
async def test_the_chat_backend_example(engine: Any) -> None:
    example = REPO / "examples" / "chat_backend.py"
    backend = await asyncio.create_subprocess_exec(
        sys.executable, str(example), f"http://127.0.0.1:{engine.center_api_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(REPO),
    )
    try:
        assert backend.stdout is not None
        line = await asyncio.wait_for(backend.stdout.readline(), 15)
        assert line.decode().strip() == "chat backend: consuming foo"
        async with websockets.connect(engine.client_url) as ann, websockets.connect(engine.client_url) as bob:
            await ann.send("hello")
            assert await asyncio.wait_for(ann.recv(), 5) == "echo: hello"  # no room yet
            for ws in (ann, bob):
                await ws.send("/join lobby")
                assert await asyncio.wait_for(ws.recv(), 5) == "joined lobby"
            await ann.send("hi all")
            ann_got = {await asyncio.wait_for(ann.recv(), 5) for _ in range(2)}
            assert "echo: hi all" in ann_got
            relayed = (ann_got - {"echo: hi all"}).pop()
            assert relayed.endswith(": hi all")
            assert await asyncio.wait_for(bob.recv(), 5) == relayed
    finally:
        if backend.returncode is None:
            backend.terminate()
        await asyncio.wait_for(backend.wait(), 10)


# --------------------------------------------------------------------------- manual acknowledgement


def test_manual_consume_and_ack_go_to_the_engine_of_each_message() -> None:
    client, a, b = fake_client(**{"queue.ack": {"acked": 1, "success": True}})
    seen: list[QueueMessage] = []
    assert result_of(client.consume("jobs", seen.append, ack="manual")) == [{"success": True}] * 2
    assert a.calls == b.calls == [("queue.consume", [{"queues": ["jobs"], "ack": "manual"}])]
    for address, message_id in (("127.0.0.1:7001", "1-0"), ("127.0.0.1:7002", "2-0")):
        client._event(client.links[address], Event("queue.consume", {
            "client_id": "", "node_id": "n", "queue": "jobs", "data": 1, "message_id": message_id,
            "redelivered": 2}))
    assert [(m.message_id, m.redelivered, m.engine) for m in seen] == [
        ("1-0", 2, "127.0.0.1:7001"), ("2-0", 2, "127.0.0.1:7002")]
    assert result_of(client.ack(*seen)) == 2
    assert a.calls[-1] == ("queue.ack", [{"queue": "jobs", "ids": ["1-0"]}])
    assert b.calls[-1] == ("queue.ack", [{"queue": "jobs", "ids": ["2-0"]}])


def test_ack_of_an_auto_message_and_bad_mode_are_refused() -> None:
    client, _, _ = fake_client()
    auto = QueueMessage("", "n", "foo", 1, "127.0.0.1:7001")
    assert isinstance(failure_of(client.ack(auto)), ConnmixError)
    error = failure_of(client.consume("foo", lambda m: None, ack="sometimes"))
    assert isinstance(error, ConnmixError) and error.code == 101


@in_asyncio
async def test_manual_ack_against_a_real_engine(engine: Any) -> None:
    client = fast_client(center_url=f"http://127.0.0.1:{engine.center_api_port}")
    client.start()
    try:
        await wait_for(client.ready())
        inbox = Inbox()
        await wait_for(client.consume("foo", inbox, ack="manual"))
        async with websockets.connect(engine.client_url) as ws:
            await ws.send("job")
            message = await inbox.next()
            assert message.message_id and message.redelivered == 0
            assert await wait_for(client.ack(message)) == 1
            assert await wait_for(client.ack(message)) == 0  # already acknowledged
            assert engine.service.engine.queues.unacked == 0
    finally:
        await wait_for(client.stop())
