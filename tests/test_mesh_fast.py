"""The mesh fast path: the requests of one API read forwarded as one submission per link.

``ApiDispatcher.handle_many`` answers ``mesh.send`` / ``conn.call`` of one read, local ones at
once, forwarded ones through ``MeshLink.submit`` (one completion per link, no Deferred per
request).  These tests join a real dispatcher, router and mesh link of engine 0 to engine 1's
real mesh point in memory (``pbmemory`` / ``meshpeer``), on a ``Clock``; engine 1's clients are
fake transports.  ``ApiWebSocketProtocol``'s ordering of replies across reads is checked with a
dispatcher that answers when told to.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from connmix_tx.engine.api import ApiDispatcher, ApiSession
from connmix_tx.engine.api_server import ApiWebSocketProtocol
from connmix_tx.engine.connections import SLOW_CONSUMER, ClientConnection, ConnectionRegistry
from connmix_tx.engine.mesh_link import MAX_BLOB, MeshLink
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.router import NODE_UNAVAILABLE, LocalOps, Router

from meshpeer import MESH_TIMEOUT, Batches, Peer, add_client, client_id
from connmix_tx.testing import tick

NODE_ID = "c8u7jfbin5659oh0b13g"


class Peers:
    """Engine 0's view of the mesh: one link, to engine 1."""

    def __init__(self, link: MeshLink) -> None:
        self.link = link

    def link_for(self, number: int) -> MeshLink | None:
        return self.link if number == 1 and self.link.state != "down" else None

    def links(self) -> list[MeshLink]:
        return [self.link] if self.link.state != "down" else []


class CountingDispatcher(ApiDispatcher):
    """Records the ``count`` hook: (method as written, code)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.counted: list[tuple[str, int]] = []

    def count(self, name: str, code: int, dialect: Any = None) -> None:
        self.counted.append((name, code))


class Cluster:
    """Engine 0 (dispatcher, router, own clients) linked to engine 1 (``peer``)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.clock = Clock()
        self.batches = Batches(monkeypatch)
        self.peer = Peer(self.clock, 1)
        self.link = self.peer.link()
        self.link.start()
        self.peer.endpoint.flush()
        assert self.link.state == "up"
        self.connections = ConnectionRegistry()
        self.router = Router(0, LocalOps(self.connections), Peers(self.link))
        queues = QueueManager(self.clock, topic_size=100, max_topics=10)
        self.dispatcher = CountingDispatcher(self.router, queues)
        self.session = ApiSession(lambda data: None, lambda: 0, NODE_ID, "127.0.0.1:50000")

    def read(self, *requests: dict | bytes) -> tuple[list, Deferred | None]:
        raws = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in requests]
        return self.dispatcher.handle_many(self.session, raws)

    def flush(self) -> None:
        self.peer.endpoint.flush()

    def local_client(self, seq: int = 1) -> ClientConnection:
        return add_client(self.connections, client_id(0, seq))


def send(target: int, data: str, request_id: Any = 1, **extra: Any) -> dict:
    return {"method": "mesh.send", "params": [{"client_id": str(target), "data": data, **extra}], "id": request_id}


def call(target: int, func: str, args: list, request_id: Any = 1) -> dict:
    return {"method": "conn.call", "params": [{"client_id": str(target), "func": func, "args": args}],
            "id": request_id}


def decoded(replies: list) -> list:
    return [None if r is None else json.loads(r) for r in replies]


def fired(d: Deferred | None) -> bool:
    box: list = []
    if d is not None:
        d.addCallback(lambda r: box.append(r) or r)
    return bool(box)


@pytest.fixture
def cluster(monkeypatch) -> Cluster:
    return Cluster(monkeypatch)


def test_forwarded_requests_of_one_read_leave_as_one_batch_and_answer_their_ids(cluster) -> None:
    remote = cluster.peer.client()
    ids = ["a", 7, None, 2.5, True] * 20
    replies, waiting = cluster.read(*[send(remote.client_id, f"m{i}", rid) for i, rid in enumerate(ids)])
    assert replies == [None] * 100 and not fired(waiting)
    cluster.flush()
    assert fired(waiting)
    assert len(cluster.batches.received) == 1
    assert [r["id"] for r in decoded(replies)] == ids
    assert all(r["error"] is None and r["result"] == {"fail": 0, "success": True, "total": 1}
               for r in decoded(replies))
    assert remote.transport.payloads == [b"m%d" % i for i in range(100)]
    assert cluster.dispatcher.counted == [("mesh.send", 0)] * 100
    assert cluster.link.pending == 0


def test_local_replies_are_ready_at_once_forwarded_ones_fill_in_later(cluster) -> None:
    mine, remote = cluster.local_client(), cluster.peer.client()
    compact = {"m": "mesh.send", "p": {"c": str(remote.client_id), "d": "c"}, "i": "x"}
    replies, waiting = cluster.read(send(mine.client_id, "here", 1), send(remote.client_id, "there", 2),
                                    compact, {"method": "server.ping", "params": [], "id": 4})
    first, second, third, fourth = decoded(replies)
    assert first["id"] == 1 and first["error"] is None and mine.transport.payloads == [b"here"]
    assert second is None and third is None
    assert fourth == {"error": None, "result": {"status": "server.pong"}, "id": 4}
    cluster.flush()
    assert fired(waiting)
    _, second, third, _ = decoded(replies)
    assert second["id"] == 2 and second["error"] is None
    assert third == {"E": None, "r": {"s": True}, "i": "x"}  # the compact reply of a compact request


def test_order_per_target_is_kept_across_reads_and_with_lua_sends(cluster) -> None:
    remote = cluster.peer.client()
    cluster.batches.holding = True
    _, first = cluster.read(*[send(remote.client_id, f"a{i}") for i in range(3)])
    cluster.link.send(remote.client_id, b"lua", False)  # another sender on the same link
    _, second = cluster.read(*[send(remote.client_id, f"b{i}") for i in range(3)])
    cluster.flush()
    cluster.batches.holding = False
    cluster.batches.release()
    cluster.flush()
    assert fired(first) and fired(second)
    assert remote.transport.payloads == [b"a0", b"a1", b"a2", b"lua", b"b0", b"b1", b"b2"]


def test_a_publish_in_the_read_does_not_overtake_earlier_sends(cluster) -> None:
    remote = cluster.peer.client(channels=("room",))
    publish = {"method": "mesh.publish", "params": [{"channel": "room", "data": "p"}], "id": 2}
    replies, waiting = cluster.read(send(remote.client_id, "s1", 1), publish, send(remote.client_id, "s2", 3))
    cluster.flush()
    assert fired(waiting)
    assert remote.transport.payloads == [b"s1", b"p", b"s2"]
    assert [op[0] for op in cluster.batches.ops()] == ["send", "publish", "send"]
    assert decoded(replies)[1]["result"] == {"fail": 0, "success": True, "total": 1}


def publish(data: str, request_id: Any = 1, channel: str = "room") -> dict:
    return {"method": "mesh.publish", "params": [{"channel": channel, "data": data}], "id": request_id}


def test_the_publishes_of_one_read_leave_in_one_batch_before_the_local_fan_out(cluster) -> None:
    remote = cluster.peer.client(channels=("room",))
    mine = cluster.local_client()
    cluster.connections.subscribe(mine, ["room"])
    outgoing = cluster.peer.endpoint.pump.clientIO  # what engine 0 wrote towards engine 1
    written_at_first_delivery: list[int] = []
    deliver = mine.transport.deliver

    def watching(data: bytes, binary: bool, shared: dict) -> str | None:
        if not written_at_first_delivery:
            written_at_first_delivery.append(len(outgoing.stream))
        return deliver(data, binary, shared)

    mine.transport.deliver = watching  # type: ignore[method-assign]
    replies, waiting = cluster.read(*[publish(f"p{i}", i) for i in range(3)])
    # The three remote parts were written (one batch) before this engine delivered anything.
    assert written_at_first_delivery and written_at_first_delivery[0] > 0
    assert mine.transport.payloads == [b"p0", b"p1", b"p2"]
    cluster.flush()
    assert fired(waiting)
    assert len(cluster.batches.received) == 1 and [op[0] for op in cluster.batches.ops()] == ["publish"] * 3
    assert remote.transport.payloads == [b"p0", b"p1", b"p2"]
    assert [r["result"] for r in decoded(replies)] == [{"fail": 0, "success": True, "total": 2}] * 3


def test_requests_after_publishes_in_one_read_come_after_them_for_every_client(cluster) -> None:
    mine, remote = cluster.local_client(), cluster.peer.client(channels=("room",))
    replies, waiting = cluster.read(
        call(mine.client_id, "subscribe", ["room"], 1), publish("p1", 2), send(mine.client_id, "s", 3),
        send(remote.client_id, "r", 4), publish("p2", 5),
        {"method": "conn.call", "params": [{"client_id": str(mine.client_id), "func": "unsubscribe",
                                             "args": ["room"]}], "id": 6},
        publish("p3", 7),
    )
    cluster.flush()
    assert fired(waiting)
    assert mine.transport.payloads == [b"p1", b"s", b"p2"]
    assert remote.transport.payloads == [b"p1", b"r", b"p2", b"p3"]
    assert [r["error"] for r in decoded(replies)] == [None] * 7


def test_a_failing_operation_does_not_fail_the_others(cluster) -> None:
    good = cluster.peer.client(1)
    slow = cluster.peer.client(2, error=SLOW_CONSUMER)
    missing = client_id(1, 99)
    replies, waiting = cluster.read(
        send(good.client_id, "one", 1), send(missing, "x", 2), send(slow.client_id, "x", 3),
        call(missing, "subscribe", ["r"], 4), call(good.client_id, "subscribe", ["r"], 5),
        send(good.client_id, "x", 6, type="binary"),  # bad base64: refused here, never sent
        send(good.client_id, "two", 7),
    )
    cluster.flush()
    assert fired(waiting)
    codes = [r["error"] and r["error"]["code"] for r in decoded(replies)]
    assert codes == [None, 401, 401, 301, None, 101, None]
    assert good.transport.payloads == [b"one", b"two"] and good.channels == {"r"}
    assert sorted(cluster.dispatcher.counted) == sorted(
        [("mesh.send", 0), ("mesh.send", 401), ("mesh.send", 401), ("conn.call", 301),
         ("conn.call", 0), ("mesh.send", 101), ("mesh.send", 0)])


def test_unanswered_batch_times_out_every_request_and_the_late_reply_is_ignored(cluster) -> None:
    remote = cluster.peer.client()
    cluster.batches.holding = True
    replies, waiting = cluster.read(send(remote.client_id, "x", 1), call(remote.client_id, "close", [], 2))
    tick(cluster.clock, MESH_TIMEOUT - 0.25, [cluster.peer.endpoint])
    assert not fired(waiting)
    tick(cluster.clock, 0.25, [cluster.peer.endpoint])
    assert fired(waiting)
    errors = [r["error"] for r in decoded(replies)]
    assert [e["code"] for e in errors] == [401, 301]
    assert all("mesh timeout" in e["message"] for e in errors)
    cluster.batches.holding = False
    cluster.batches.release()
    cluster.flush()
    assert [r["error"]["code"] for r in decoded(replies)] == [401, 301]  # unchanged
    assert cluster.link.pending == 0


def test_link_loss_ends_every_forwarded_request_with_node_unavailable(cluster) -> None:
    remote = cluster.peer.client()
    cluster.batches.holding = True
    replies, waiting = cluster.read(*[send(remote.client_id, f"{i}", i) for i in range(5)])
    cluster.flush()
    cluster.peer.endpoint.lose()
    assert fired(waiting)
    assert all(NODE_UNAVAILABLE in r["error"]["message"] and r["error"]["code"] == 401
               for r in decoded(replies))
    # Later reads do not wait at all: the engine is unavailable.
    replies, waiting = cluster.read(send(remote.client_id, "later", 9))
    assert waiting is None and decoded(replies)[0]["error"]["code"] == 401


def test_size_limits_hold_on_the_fast_path(cluster) -> None:
    remote = cluster.peer.client()
    big = "x" * (200 * 1024)
    too_large = "y" * (600 * 1024)
    replies, waiting = cluster.read(send(remote.client_id, big, 1), send(remote.client_id, too_large, 2),
                                    send(remote.client_id, big, 3), send(remote.client_id, "small", 4))
    cluster.flush()
    assert fired(waiting)
    codes = [r["error"] and r["error"]["code"] for r in decoded(replies)]
    assert codes == [None, 401, None, None]
    assert "message too large" in decoded(replies)[1]["error"]["message"]
    assert len(cluster.batches.received) == 2 and max(cluster.batches.sizes) <= MAX_BLOB
    assert [len(d) for d in remote.transport.payloads] == [len(big), len(big), 5]


def test_a_read_whose_only_operation_is_too_large_is_answered_at_once(cluster) -> None:
    remote = cluster.peer.client()
    replies, waiting = cluster.read(send(remote.client_id, "z" * (600 * 1024), 1))
    # Refused locally, before anything was sent: nothing to wait for.
    assert waiting is None and decoded(replies)[0]["error"]["code"] == 401
    cluster.flush()
    assert cluster.batches.received == []


def test_submit_with_no_operation_completes_at_once(cluster) -> None:
    got: list = []
    cluster.link.submit([], got.append)
    assert got == [[]]


# Replies of pipelined reads on one API connection ------------------------------------------------


class HeldDispatcher:
    """Answers each read with its own replies; reads named in ``hold`` wait until released."""

    def __init__(self) -> None:
        self.held: list[tuple[list, Deferred]] = []

    def handle_many(self, session: Any, raws: list[bytes]) -> tuple[list, Deferred | None]:
        replies: list = []
        waiting = None
        for raw in raws:
            if raw.startswith(b"wait"):
                replies.append(None)
                if waiting is None:
                    waiting = Deferred()
                    self.held.append((replies, waiting))
            else:
                replies.append(b"r:" + raw)
        return replies, waiting

    def release(self) -> None:
        replies, waiting = self.held.pop(0)
        for i, reply in enumerate(replies):
            if reply is None:
                replies[i] = b"filled"
        waiting.callback(replies)


def api_protocol(dispatcher: HeldDispatcher) -> tuple[ApiWebSocketProtocol, list[bytes]]:
    proto = ApiWebSocketProtocol()
    proto.factory = type("Factory", (), {"dispatcher": dispatcher})()
    proto.session = ApiSession(lambda data: None, lambda: 0, NODE_ID)
    proto._replies = deque()
    written: list[bytes] = []
    proto._write_all = lambda replies: written.extend(replies)  # type: ignore[method-assign]
    return proto, written


def test_replies_of_pipelined_reads_are_written_in_request_order() -> None:
    dispatcher = HeldDispatcher()
    proto, written = api_protocol(dispatcher)
    proto._dispatch([b"1", b"wait2", b"3"])
    assert written == [b"r:1"]  # ready before the first waiting one: written at once
    proto._dispatch([b"4"])
    proto._dispatch([b"wait5", b"6"])
    assert written == [b"r:1"]
    dispatcher.release()
    assert written == [b"r:1", b"filled", b"r:3", b"r:4"]
    dispatcher.release()
    assert written == [b"r:1", b"filled", b"r:3", b"r:4", b"filled", b"r:6"]
    proto._dispatch([b"7"])
    assert written[-1] == b"r:7"


def test_a_failing_completion_does_not_keep_the_others_of_its_batch_waiting(cluster) -> None:
    remote = cluster.peer.client()
    got: list = []

    def broken(results: list) -> None:
        raise RuntimeError("bug in a completion")

    cluster.link.submit([("send", remote.client_id, b"a", False)], broken)
    cluster.link.submit([("send", remote.client_id, b"b", False), ("call", remote.client_id, "close", [])],
                        got.append)
    cluster.flush()
    assert got == [[None, None]]
    assert remote.transport.payloads == [b"a", b"b"] and cluster.link.pending == 0
