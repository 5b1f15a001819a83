"""Tests for connmix_tx.engine.router: local operations, conn.call functions, routing
(docs/operations.md, "Routing")."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from connmix_tx.engine.connections import (
    CLIENT_NOT_FOUND,
    MAX_CHANNELS_PER_CONNECTION,
    SLOW_CONSUMER,
    ClientConnection,
    ConnectionRegistry,
)
from connmix_tx.engine.router import CALL_FUNCS, NODE_UNAVAILABLE, LocalOps, Router, apply_call
from connmix_tx.ids import Snowflake, node_number_of
from connmix_tx.testing import FakeClientTransport, FakeLink, FakePeers

NOW_MS = 1_700_000_000_000


class Node:
    """One engine's connections, with ids of node number ``number``."""

    def __init__(self, number: int = 0) -> None:
        self.registry = ConnectionRegistry()
        self.local = LocalOps(self.registry)
        self._ids = Snowflake(number, lambda: NOW_MS)

    def connect(self, error: str | None = None, ready: bool = True) -> ClientConnection:
        conn = ClientConnection(self._ids.next_id(), "203.0.113.9:5000", FakeClientTransport(error))
        conn.ready = ready
        self.registry.add(conn)
        return conn


@pytest.fixture
def node() -> Node:
    return Node(0)


def remote_id(number: int) -> int:
    return Snowflake(number, lambda: NOW_MS).next_id()


# LocalOps ------------------------------------------------------------------------------------


def test_send_to_a_live_connection(node) -> None:
    conn = node.connect()
    assert node.local.send(conn.client_id, b"hello, world!", False) is None
    assert node.local.send(conn.client_id, b"\x00\x01", True) is None
    assert conn.transport.delivered == [(b"hello, world!", False), (b"\x00\x01", True)]


def test_send_to_unknown_handshaking_or_closed_connection_is_not_found(node) -> None:
    handshaking = node.connect(ready=False)
    closed = node.connect()
    closed.mark_closed()
    for client_id in (handshaking.client_id, closed.client_id, 12345):
        assert node.local.send(client_id, b"x", False) == CLIENT_NOT_FOUND
    assert handshaking.transport.delivered == closed.transport.delivered == []


def test_send_passes_the_transport_error_on(node) -> None:
    conn = node.connect(error=SLOW_CONSUMER)
    assert node.local.send(conn.client_id, b"x", False) == SLOW_CONSUMER


def test_publish_counts_success_and_fail_and_shares_one_dict(node) -> None:
    good1, good2, bad = node.connect(), node.connect(), node.connect(error=SLOW_CONSUMER)
    gone = node.connect()
    other = node.connect()
    for conn in (good1, good2, bad, gone):
        assert node.registry.subscribe(conn, ["ch"]) is None
    gone.mark_closed()
    assert node.local.publish("ch", b"news", False) == (2, 1)
    assert good1.transport.delivered == good2.transport.delivered == [(b"news", False)]
    assert gone.transport.delivered == other.transport.delivered == []
    shared = good1.transport.shared + good2.transport.shared + bad.transport.shared
    assert all(s is shared[0] for s in shared)


def test_publish_to_nobody(node) -> None:
    assert node.local.publish("empty", b"x", False) == (0, 0)


def test_call_on_unknown_client(node) -> None:
    assert node.local.call(42, "close", []) == "client 42 not found"


def test_call_applies_to_a_live_client(node) -> None:
    conn = node.connect()
    assert node.local.call(conn.client_id, "set_context_value", ["user_id", 10000]) is None
    assert conn.context == {"user_id": 10000}


# apply_call ----------------------------------------------------------------------------------


def test_call_funcs_are_the_spec_list() -> None:
    assert set(CALL_FUNCS) == {"set_context_value", "set_context", "subscribe", "unsubscribe", "close"}


def test_set_context_value_sets_removes_and_wakes_waiters(node) -> None:
    conn = node.connect()
    waiter = conn.wait_context_value("user_id")
    got: list = []
    waiter.addCallback(got.append)
    assert apply_call(node.registry, conn, "set_context_value", ["user_id", 10000]) is None
    assert conn.context == {"user_id": 10000} and got == [10000]
    assert apply_call(node.registry, conn, "set_context_value", [7, "seven"]) is None
    assert conn.context["7"] == "seven"
    assert apply_call(node.registry, conn, "set_context_value", ["user_id", None]) is None
    assert conn.context == {"7": "seven"}


def test_set_context_merges(node) -> None:
    conn = node.connect()
    conn.context.update({"a": 1, "b": 2})
    assert apply_call(node.registry, conn, "set_context", [{"b": 3, "c": {"d": [1]}, "a": None}]) is None
    assert conn.context == {"b": 3, "c": {"d": [1]}}


def test_subscribe_and_unsubscribe(node) -> None:
    conn = node.connect()
    assert apply_call(node.registry, conn, "subscribe", ["channel1", "channel2"]) is None
    assert conn.channels == {"channel1", "channel2"}
    assert node.registry.subscribers("channel1") == [conn]
    assert apply_call(node.registry, conn, "unsubscribe", ["channel1", "unknown"]) is None
    assert conn.channels == {"channel2"}
    assert node.registry.subscribers("channel1") == []


def test_subscribe_errors_are_returned(node) -> None:
    conn = node.connect()
    assert "invalid channel" in apply_call(node.registry, conn, "subscribe", ["ok", "not ok"])
    assert conn.channels == set()
    many = [f"ch{i}" for i in range(MAX_CHANNELS_PER_CONNECTION)]
    assert apply_call(node.registry, conn, "subscribe", many) is None
    assert "limit" in apply_call(node.registry, conn, "subscribe", ["one-more"])
    assert len(conn.channels) == MAX_CHANNELS_PER_CONNECTION


def test_close(node) -> None:
    conn = node.connect()
    assert apply_call(node.registry, conn, "close", []) is None
    assert conn.transport.closed


def test_unknown_func(node) -> None:
    assert apply_call(node.registry, node.connect(), "explode", []) == "unknown func explode"


# Router --------------------------------------------------------------------------------------


def test_own_number_is_local(node) -> None:
    router = Router(0, node.local)
    conn = node.connect()
    assert router.send(conn.client_id, b"hi", False) is None
    assert conn.transport.delivered == [(b"hi", False)]
    assert router.call(conn.client_id, "subscribe", ["news"]) is None
    assert router.publish("news", b"n", False) == (1, 0)
    assert router.send(conn.client_id + 1, b"x", False) == CLIENT_NOT_FOUND


@pytest.mark.parametrize("peers", [None, FakePeers({}), FakePeers({3: FakeLink()})])
def test_other_number_without_a_link_is_node_unavailable(peers) -> None:
    router = Router(0, Node(0).local, peers)
    client_id = remote_id(5)
    assert node_number_of(client_id) == 5
    assert router.send(client_id, b"x", False) == NODE_UNAVAILABLE
    assert router.call(client_id, "close", []) == NODE_UNAVAILABLE


def test_other_number_goes_to_its_link() -> None:
    pending: Deferred = Deferred()
    link = FakeLink(send=pending, call="client 1 not found")
    router = Router(0, Node(0).local, FakePeers({5: link}))
    client_id = remote_id(5)
    assert router.send(client_id, b"x", True) is pending
    assert router.call(client_id, "subscribe", ["a"]) == "client 1 not found"
    assert link.calls == [("send", client_id, b"x", True), ("call", client_id, "subscribe", ["a"])]


def test_publish_sums_local_and_every_peer(node) -> None:
    for conn in (node.connect(), node.connect(error=SLOW_CONSUMER)):
        node.registry.subscribe(conn, ["ch"])
    links = {1: FakeLink(publish=(3, 0)), 2: FakeLink(publish=(0, 0)), 7: FakeLink(publish=(4, 2))}
    result = Router(0, node.local, FakePeers(links)).publish("ch", b"x", False)
    assert isinstance(result, Deferred)
    got: list = []
    result.addCallback(got.append)
    assert got == [(1 + 3 + 0 + 4, 1 + 0 + 2)]
    assert all(link.calls == [("publish", "ch", b"x", False)] for link in links.values())


def test_publish_without_peers_is_synchronous(node) -> None:
    assert Router(0, node.local, FakePeers({})).publish("ch", b"x", False) == (0, 0)


def test_held_publishes_go_to_the_peers_first_and_fan_out_here_when_released(node) -> None:
    conn = node.connect()
    node.registry.subscribe(conn, ["ch"])
    link = FakeLink(publish=(1, 0))
    router = Router(0, node.local, FakePeers({1: link}))
    router.hold_publishes()
    results = [router.publish("ch", b"p%d" % i, False) for i in range(3)]
    assert [c[0] for c in link.calls] == ["publish"] * 3 and link.sent_now == 0
    assert conn.transport.delivered == []  # held back until the row of publishes ends
    router.release_publishes()
    assert link.sent_now == 1  # the three leave together, before the fan-out here
    assert [d for d, _ in conn.transport.delivered] == [b"p0", b"p1", b"p2"]
    got: list = []
    for result in results:
        result.addCallback(got.append)
    assert got == [(2, 0)] * 3
    router.publish("ch", b"later", False)  # not holding any more: at once
    assert link.sent_now == 2 and conn.transport.delivered[-1][0] == b"later"


@pytest.mark.parametrize("then", ["send", "call", "route"])
def test_any_other_routing_runs_the_held_publishes_first(node, then) -> None:
    conn = node.connect()
    node.registry.subscribe(conn, ["ch"])
    router = Router(0, node.local, FakePeers({1: FakeLink()}))
    router.hold_publishes()
    router.publish("ch", b"p", False)
    if then == "send":
        router.send(conn.client_id, b"s", False)
    elif then == "call":
        router.call(conn.client_id, "unsubscribe", ["ch"])
    else:
        router.route(conn.client_id)
    router.publish("ch", b"q", False)
    router.release_publishes()
    expected = {"send": [b"p", b"s", b"q"], "call": [b"p"], "route": [b"p", b"q"]}[then]
    assert [d for d, _ in conn.transport.delivered] == expected
