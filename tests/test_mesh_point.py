"""Tests for connmix_tx.engine.mesh: the mesh point's batch wire format (docs/operations.md,
"The mesh").

``apply_batch`` runs on a ``LocalOps`` with fake client transports; one test goes through
``mesh_factory`` over in-memory PB, as a peer engine would.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.test import iosim

from connmix_tx.engine.connections import (
    CLIENT_NOT_FOUND,
    ENCODE_FAILED,
    SLOW_CONSUMER,
    ClientConnection,
    ConnectionRegistry,
)
from connmix_tx.engine import mesh as mesh_module
from connmix_tx.engine.mesh import MeshPeerAvatar, apply_batch, mesh_factory
from connmix_tx.engine.router import LocalOps
from connmix_tx.testing import FakeClientTransport

CLIENT = 1463819408261513216
OTHER = CLIENT + 1


@pytest.fixture
def local() -> LocalOps:
    return LocalOps(ConnectionRegistry())


def connect(local: LocalOps, client_id: int = CLIENT, error: str | None = None) -> ClientConnection:
    conn = ClientConnection(client_id, "203.0.113.9:5000", FakeClientTransport(error))
    conn.ready = True
    local.connections.add(conn)
    return conn


def batch(local: LocalOps, *ops: Any) -> list[list]:
    """Pack ``ops`` as a peer does, run them, unpack the reply."""
    reply = apply_batch(local, msgpack.packb(list(ops), use_bin_type=True))
    assert isinstance(reply, bytes)
    return msgpack.unpackb(reply, raw=False)


def args(*values: Any) -> bytes:
    return json.dumps(list(values)).encode()


# Operations ----------------------------------------------------------------------------------


def test_send_text_and_binary(local) -> None:
    conn = connect(local)
    replies = batch(local, ["send", 1, CLIENT, b"hello, world!", "text"],
                    ["send", 2, CLIENT, b"\x00\xff", "binary"])
    assert replies == [[1, 0, None, None], [2, 0, None, None]]
    assert conn.transport.delivered == [(b"hello, world!", False), (b"\x00\xff", True)]


@pytest.mark.parametrize("error, status", [(SLOW_CONSUMER, 2), (ENCODE_FAILED, 3)])
def test_send_failures_have_their_status(local, error, status) -> None:
    connect(local, error=error)
    assert batch(local, ["send", 9, CLIENT, b"x", "text"]) == [[9, status, error, None]]


def test_send_to_unknown_client_is_status_1(local) -> None:
    handshaking = connect(local, OTHER)
    handshaking.ready = False
    assert batch(local, ["send", 1, CLIENT, b"x", "text"], ["send", 2, OTHER, b"x", "text"]) == [
        [1, 1, CLIENT_NOT_FOUND, None],
        [2, 1, CLIENT_NOT_FOUND, None],
    ]
    assert handshaking.transport.delivered == []


def test_publish_answers_success_and_fail_counts(local) -> None:
    for client_id, error in ((CLIENT, None), (OTHER, None), (OTHER + 1, SLOW_CONSUMER)):
        local.connections.subscribe(connect(local, client_id, error), ["channel1"])
    replies = batch(local, ["publish", 4, "channel1", b"news", "text"],
                    ["publish", 5, "nobody", b"x", "text"])
    assert replies == [[4, 0, 2, 1], [5, 0, 0, 0]]
    assert local.connections.by_id[CLIENT].transport.delivered == [(b"news", False)]


def test_call_applies_each_func(local) -> None:
    conn = connect(local)
    replies = batch(
        local,
        ["call", 1, CLIENT, "set_context_value", args("user_id", 10000)],
        ["call", 2, CLIENT, "set_context", args({"room": "r1"})],
        ["call", 3, CLIENT, "subscribe", args("channel1", "channel2")],
        ["call", 4, CLIENT, "unsubscribe", args("channel2")],
        ["call", 5, CLIENT, "close", args()],
    )
    assert replies == [[seq, 0, None, None] for seq in range(1, 6)]
    assert conn.context == {"user_id": 10000, "room": "r1"}
    assert conn.channels == {"channel1"}
    assert conn.transport.closed


def test_call_errors(local) -> None:
    connect(local)
    replies = batch(
        local,
        ["call", 1, OTHER, "close", args()],
        ["call", 2, CLIENT, "explode", args()],
        ["call", 3, CLIENT, "subscribe", args("not ok")],
    )
    assert [r[:2] for r in replies] == [[1, 1], [2, 4], [3, 4]]
    assert all(isinstance(r[2], str) and r[2] for r in replies)  # a = the message


def test_ping(local) -> None:
    assert batch(local, ["ping", 77]) == [[77, 0, None, None]]


def test_empty_batch(local) -> None:
    assert batch(local) == []


# Malformed operations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        ["send", 2],  # fields missing
        ["send", 2, CLIENT, "text, not bytes", "text"],
        ["send", 2, "not a number", b"x", "text"],
        ["call", 2, CLIENT, "set_context_value", b"not json"],
        ["call", 2, CLIENT, "set_context_value", args("only the key")],
        ["call", 2, CLIENT, "set_context", args("not an object")],
        ["explode", 2],
    ],
)
def test_malformed_op_is_status_4_and_the_others_are_answered(local, bad) -> None:
    conn = connect(local)
    replies = batch(local, ["send", 1, CLIENT, b"before", "text"], bad, ["ping", 3])
    assert [r[:2] for r in replies] == [[1, 0], [2, 4], [3, 0]]
    assert isinstance(replies[1][2], str)
    assert conn.transport.delivered == [(b"before", False)]


@pytest.mark.parametrize("bad", [5, None, [], ["ping"], {"op": "ping"}])
def test_op_without_a_seq_is_answered_with_seq_none(local, bad) -> None:
    replies = batch(local, ["ping", 1], bad, ["ping", 2])
    assert [r[:2] for r in replies] == [[1, 0], [None, 4], [2, 0]]


def test_replies_keep_the_order_of_the_ops(local) -> None:
    connect(local)
    ops = []
    for seq in range(50, 0, -1):  # seqs in descending order: replies follow ops, not seqs
        kind = seq % 3
        ops.append(["ping", seq] if kind == 0 else
                   ["send", seq, CLIENT if kind == 1 else OTHER, b"%d" % seq, "text"])
    replies = batch(local, *ops)
    assert [r[0] for r in replies] == list(range(50, 0, -1))
    assert [r[1] for r in replies] == [1 if seq % 3 == 2 else 0 for seq in range(50, 0, -1)]
    sent = [d for d, _ in local.connections.by_id[CLIENT].transport.delivered]
    assert sent == [b"%d" % seq for seq in range(50, 0, -1) if seq % 3 == 1]


def test_integer_data_is_a_bad_request(local) -> None:
    conn = connect(local)
    assert batch(local, ["send", 1, CLIENT, 5, "text"])[0][1] == 4
    assert conn.transport.delivered == []


def test_call_args_of_the_wrong_shape_are_a_bad_request(local) -> None:
    conn = connect(local)
    assert batch(local, ["call", 1, CLIENT, "subscribe", b'"abc"'])[0][1] == 4
    assert conn.channels == set()


# Through PB ----------------------------------------------------------------------------------


def test_batch_over_pb(local) -> None:
    conn = connect(local)
    factory = mesh_factory(local, "s3cret")
    peer = IPv4Address("TCP", "10.0.0.8", 41000)
    client_factory = pb.PBClientFactory()
    _, _, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(peer), lambda: client_factory.buildProtocol(None))
    results: list = []

    def run(d: Any) -> Any:
        d.addBoth(results.append)
        pump.flush()
        return results.pop()

    refused = run(client_factory.login(UsernamePassword(b"c8u7jfbin5659oh0b13g", b"wrong")))
    assert isinstance(refused, Failure) and "login refused" in refused.getErrorMessage()
    avatar = run(client_factory.login(UsernamePassword(b"c8u7jfbin5659oh0b13g", b"s3cret")))
    blob = msgpack.packb([["send", 1, CLIENT, b"via mesh", "text"], ["ping", 2]], use_bin_type=True)
    reply = run(avatar.callRemote("batch", blob))
    assert msgpack.unpackb(reply, raw=False) == [[1, 0, None, None], [2, 0, None, None]]
    assert conn.transport.delivered == [(b"via mesh", False)]


def test_the_answer_to_a_batch_leaves_ahead_of_the_client_writes_it_made(local, monkeypatch) -> None:
    clock = Clock()
    order: list[str] = []
    monkeypatch.setattr(mesh_module, "send_now", lambda transport: order.append(f"answer to {transport}"))
    conn = ClientConnection(1 << 22, "203.0.113.9:5000", FakeClientTransport())
    conn.ready = True
    local.connections.add(conn)
    deliver = conn.transport.deliver

    def writing(data: bytes, binary: bool, shared: dict) -> str | None:
        clock.callLater(0, order.append, "client writes")  # what the outbox does
        return deliver(data, binary, shared)

    conn.transport.deliver = writing  # type: ignore[method-assign]
    avatar = MeshPeerAvatar(local, "peer", clock=clock)
    class Broker:  # what pb.Avatar asks of its broker, nothing more
        transport = "the peer"

        def unserialize(self, value: Any, *_: Any) -> Any:
            return value

        def serialize(self, value: Any, *_: Any) -> Any:
            return value

    broker = Broker()
    blob = msgpack.packb([["send", 1, conn.client_id, b"x", "text"]], use_bin_type=True)
    answer = avatar.perspectiveMessageReceived(broker, "batch", (blob,), {})
    assert msgpack.unpackb(answer, raw=False) == [[1, 0, None, None]]
    clock.advance(0)
    assert order == ["answer to the peer", "client writes"]
