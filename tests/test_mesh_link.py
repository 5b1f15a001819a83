"""Tests for connmix_tx.engine.mesh_link.MeshLink: one engine's link to a peer (docs/operations.md,
"The mesh").

Each link dials a real ``mesh_factory`` mesh point joined in memory (``connmix_tx.testing.MemoryEndpoint``); the peer's
clients are fake transports (``meshpeer``).  ``Batches`` records what the mesh point receives and
can hold its replies back; a ``Clock`` drives flushes, meshTimeout, pings and retries.
"""

from __future__ import annotations

import msgpack
import pytest
from twisted.internet.task import Clock

from connmix_tx.engine.connections import CLIENT_NOT_FOUND, SLOW_CONSUMER
from connmix_tx.engine.mesh_link import MAX_BLOB, MAX_IN_FLIGHT, MeshLink
from connmix_tx.engine.router import NODE_UNAVAILABLE

from connmix_tx.metrics import EngineMeter
from connmix_tx.testing import LogCapture, sample_value, tick
from meshpeer import MESH_TIMEOUT, OWN_ID, SECRET, WAITING, Batches, Peer, client_id, results


@pytest.fixture
def batches(monkeypatch) -> Batches:
    return Batches(monkeypatch)


@pytest.fixture
def peer() -> Peer:
    return Peer(Clock(), 1)


@pytest.fixture
def link(peer, batches) -> MeshLink:
    """A link to ``peer``, up."""
    link = peer.link()
    link.start()
    peer.endpoint.flush()
    assert link.state == "up"
    return link


# Operations over PB ------------------------------------------------------------------------------


def test_link_comes_up_and_logs_it(peer, batches) -> None:
    link = peer.link()
    with LogCapture() as logs:
        link.start()
        assert link.state == "connecting"
        peer.endpoint.flush()
    assert link.state == "up"
    assert "mesh link to peer1 (10.0.0.1:6788) up" in logs.texts("connmix.mesh")


def test_send_publish_call_are_answered_and_delivered(peer, link) -> None:
    conn = peer.client(channels=("news",))
    peer.client(2, channels=("news",))
    peer.client(3, error=SLOW_CONSUMER, channels=("news",))
    ops = [
        link.send(conn.client_id, b"hello", False),
        link.send(conn.client_id, b"\x00\xff", True),
        link.publish("news", b"flash", False),
        link.publish("nobody", b"x", False),
        link.call(conn.client_id, "set_context_value", ["user_id", 10000]),
        link.call(conn.client_id, "subscribe", ["room1"]),
    ]
    peer.endpoint.flush()
    assert results(*ops) == [None, None, (2, 1), (0, 0), None, None]
    assert conn.transport.payloads == [b"hello", b"\x00\xff", b"flash"]
    assert conn.context == {"user_id": 10000} and conn.channels == {"news", "room1"}
    assert link.pending == 0


def test_delivery_errors_come_back_as_texts(peer, link) -> None:
    slow = peer.client(error=SLOW_CONSUMER)
    missing = client_id(1, 99)
    ops = [
        link.send(missing, b"x", False),
        link.send(slow.client_id, b"x", False),
        link.call(missing, "close", []),
        link.call(slow.client_id, "explode", []),
    ]
    peer.endpoint.flush()
    sent_to_missing, sent_to_slow, call_missing, bad_call = results(*ops)
    assert (sent_to_missing, sent_to_slow) == (CLIENT_NOT_FOUND, SLOW_CONSUMER)
    assert call_missing == f"client {missing} not found"
    assert isinstance(bad_call, str) and bad_call.startswith("bad request")


def test_ops_submitted_while_connecting_go_out_once_up(peer, batches) -> None:
    conn = peer.client()
    link = peer.link()
    link.start()
    d = link.send(conn.client_id, b"early", False)
    peer.endpoint.flush()
    assert results(d) == [None] and conn.transport.payloads == [b"early"]


# Batching ----------------------------------------------------------------------------------------


def test_one_reactor_turn_is_one_batch_in_order(peer, link, batches) -> None:
    conn = peer.client()
    ops = [link.send(conn.client_id, b"%d" % i, False) for i in range(100)]
    peer.endpoint.flush()
    assert len(batches.received) == 1
    assert [op[3] for op in batches.ops()] == [b"%d" % i for i in range(100)]
    assert len({op[1] for op in batches.ops()}) == 100  # seqs unique per link
    assert results(*ops) == [None] * 100
    assert conn.transport.payloads == [b"%d" % i for i in range(100)]


def test_more_than_256_kib_is_split_into_blobs_in_order(peer, link, batches) -> None:
    conn = peer.client()
    payloads = [bytes([65 + i]) * (100 * 1024) for i in range(5)] + [b"small"]
    ops = [link.send(conn.client_id, data, False) for data in payloads]
    peer.endpoint.flush()
    assert len(batches.received) == 3  # 2 + 2 + (1 + small)
    assert max(batches.sizes) <= MAX_BLOB
    assert results(*ops) == [None] * 6
    assert conn.transport.payloads == payloads


def test_a_full_blob_is_at_most_256_kib(peer, link, batches) -> None:
    conn = peer.client()
    op_size = len(msgpack.packb(["send", 1, conn.client_id, b"x" * 131072, "text"], use_bin_type=True))
    n = 131072 - (2 * op_size - MAX_BLOB) // 2  # two ops of exactly MAX_BLOB / 2 each
    link.send(conn.client_id, b"x" * n, False)
    link.send(conn.client_id, b"y" * n, False)
    peer.endpoint.flush()
    assert len(batches.ops("send")) == 2
    assert max(batches.sizes) <= MAX_BLOB


def test_op_over_600_kib_is_refused_without_sending(peer, link, batches) -> None:
    conn = peer.client()
    too_large = b"x" * (600 * 1024)  # plus the op's own fields: over the limit
    refused = [link.send(conn.client_id, too_large, False), link.publish("news", too_large, False),
               link.call(conn.client_id, "set_context_value", ["k", "x" * 600 * 1024])]
    assert results(*refused) == ["message too large", (0, 0), "message too large"]
    peer.endpoint.flush()
    assert batches.received == [] and link.pending == 0
    big = link.send(conn.client_id, b"x" * (590 * 1024), False)  # under the limit: its own blob
    peer.endpoint.flush()
    assert results(big) == [None] and len(conn.transport.payloads[0]) == 590 * 1024


def test_at_most_8_batches_in_flight(peer, link, batches) -> None:
    conn = peer.client()
    batches.holding = True
    ops = []
    for i in range(MAX_IN_FLIGHT + 1):  # one op per reactor turn: one batch each
        ops.append(link.send(conn.client_id, b"%d" % i, False))
        peer.endpoint.flush()
    assert len(batches.received) == MAX_IN_FLIGHT  # the 9th waits
    assert results(ops[-1]) == [WAITING]
    batches.release(1)
    peer.endpoint.flush()
    assert len(batches.received) == MAX_IN_FLIGHT + 1
    batches.release()
    peer.endpoint.flush()
    assert results(*ops) == [None] * len(ops)
    assert conn.transport.payloads == [b"%d" % i for i in range(MAX_IN_FLIGHT + 1)]


# meshTimeout -------------------------------------------------------------------------------------


def test_unanswered_ops_time_out_and_late_replies_are_ignored(peer, link, batches) -> None:
    conn = peer.client(channels=("news",))
    batches.holding = True
    ops = [link.send(conn.client_id, b"x", False), link.publish("news", b"x", False),
           link.call(conn.client_id, "close", [])]
    tick(peer.clock, MESH_TIMEOUT - 0.25, [peer.endpoint])
    assert results(*ops) == [WAITING] * 3
    tick(peer.clock, 0.25, [peer.endpoint])
    assert results(*ops) == ["mesh timeout", (0, 0), "mesh timeout"]
    batches.holding = False
    batches.release()  # the late reply arrives: ignored
    peer.endpoint.flush()
    assert link.state == "up" and link.pending == 0
    assert results(link.send(conn.client_id, b"again", False)) == [WAITING]
    peer.endpoint.flush()
    assert conn.transport.payloads[-1] == b"again"


def test_op_timed_out_while_queued_is_never_sent(peer, link, batches) -> None:
    conn = peer.client()
    batches.holding = True
    for _ in range(MAX_IN_FLIGHT):
        link.send(conn.client_id, b"in flight", False)
        peer.endpoint.flush()
    queued = link.send(conn.client_id, b"queued", False)
    tick(peer.clock, MESH_TIMEOUT, [peer.endpoint])
    assert results(queued) == ["mesh timeout"]
    batches.holding = False
    batches.release()
    peer.endpoint.flush()
    assert b"queued" not in [op[3] for op in batches.ops("send")]


# Link loss and reconnection ----------------------------------------------------------------------


def test_in_flight_ops_fail_with_node_unavailable_when_the_link_is_lost(peer, link, batches) -> None:
    conn = peer.client(channels=("news",))
    batches.holding = True
    ops = [link.send(conn.client_id, b"x", False), link.publish("news", b"x", False)]
    peer.endpoint.flush()
    peer.endpoint.lose()
    assert results(*ops) == [NODE_UNAVAILABLE, (0, 0)]


def test_lost_link_is_down_and_fails_everything_at_once(peer, link, batches) -> None:
    conn = peer.client()
    batches.holding = True
    in_flight = [link.send(conn.client_id, b"%d" % i, False) for i in range(3)]
    peer.endpoint.flush()
    queued = link.send(conn.client_id, b"queued", False)  # not flushed yet
    with LogCapture() as logs:
        peer.endpoint.pump.clientIO.loseConnection()
        while peer.endpoint.pump.pump(advanceClock=False):  # report the loss, run no flush yet
            pass
    assert results(*in_flight, queued) == [NODE_UNAVAILABLE] * 4
    assert link.state == "down"
    assert "mesh link to peer1 (10.0.0.1:6788) down: connection lost" in logs.texts("connmix.mesh")
    assert results(link.send(conn.client_id, b"later", False)) == [NODE_UNAVAILABLE]
    peer.clock.advance(0)  # nothing is written to the dead broker
    assert link.pending == 0


def test_link_reconnects_after_loss(peer, link, batches) -> None:
    conn = peer.client()
    peer.endpoint.lose()
    tick(peer.clock, 1, [peer.endpoint])  # ClientService retries after 1 s
    assert len(peer.endpoint.pumps) == 2 and link.state == "up"
    d = link.send(conn.client_id, b"after", False)
    peer.endpoint.flush()
    assert results(d) == [None] and conn.transport.payloads == [b"after"]


def test_connection_closed_before_pb_negotiation_is_redialled(peer, batches) -> None:
    link = peer.link()
    link.start()
    peer.endpoint.pump.serverIO.getOutBuffer()  # the peer's greeting never arrives
    peer.endpoint.lose()
    tick(peer.clock, 1, [peer.endpoint])
    assert len(peer.endpoint.pumps) == 2 and link.state == "up"


def test_refused_login_is_retried_with_back_off(peer, batches) -> None:
    link = peer.link(secret="not the secret")
    with LogCapture() as logs:
        link.start()
        tick(peer.clock, 60, [peer.endpoint])
    assert link.state == "connecting" and batches.received == []
    assert any(t.startswith("mesh link to peer1 (10.0.0.1:6788) refused: ") for t in logs.texts())
    assert peer.endpoint.attempts <= 8  # at 0, 1, 3, 7, 15, 31 s, then every 30 s


# Pings and silent peers --------------------------------------------------------------------------


def test_idle_link_pings_every_interval_and_stays_up(peer, link, batches) -> None:
    tick(peer.clock, 4.75, [peer.endpoint])
    assert batches.received == []
    tick(peer.clock, 0.25, [peer.endpoint])
    assert [op[0] for op in batches.ops()] == ["ping"]
    tick(peer.clock, 55, [peer.endpoint])
    assert len(batches.ops("ping")) == 12 and batches.ops() == batches.ops("ping")
    assert link.state == "up" and link.pending == 0


def test_busy_link_does_not_ping(peer, link, batches) -> None:
    conn = peer.client()
    for _ in range(20):
        link.send(conn.client_id, b"x", False)
        tick(peer.clock, 1, [peer.endpoint])
    assert batches.ops("ping") == []


def test_silent_peer_is_dropped_after_heartbeat_timeout_and_redialled(peer, link, batches) -> None:
    conn = peer.client()
    tick(peer.clock, 14.75)  # nothing pumped: the peer answers nothing
    pending = link.send(conn.client_id, b"x", False)
    assert link.state == "up"
    with LogCapture() as logs:
        tick(peer.clock, 0.25)
    assert link.state == "down"
    assert results(pending) == [NODE_UNAVAILABLE]
    assert "mesh link to peer1 (10.0.0.1:6788) down: no answer for 15s" in logs.texts("connmix.mesh")
    assert results(link.send(conn.client_id, b"x", False)) == [NODE_UNAVAILABLE]  # at once
    peer.endpoint.flush()  # the old connection closes
    tick(peer.clock, 1, [peer.endpoint])
    assert len(peer.endpoint.pumps) == 2 and link.state == "up"


def test_a_completion_that_raises_does_not_keep_the_others_of_the_reply_from_ending(peer, link) -> None:
    first, second = peer.client(1), peer.client(2)
    ended: list = []

    def broken(result: object) -> None:
        raise RuntimeError("a caller's bug")

    with LogCapture() as logs:
        link.submit_one(("send", first.client_id, b"a", False), broken)
        link.submit_one(("send", second.client_id, b"b", False), ended.append)
        link.submit([("send", 999, b"c", False)], lambda results: 1 / 0)
        link.submit_one(("send", first.client_id, b"d", False), ended.append)
        peer.endpoint.flush()
    assert ended == [None, None]
    assert first.transport.payloads == [b"a", b"d"] and second.transport.payloads == [b"b"]
    assert len(logs.find("mesh completion failed")) == 2
    assert link.pending == 0


def test_forwarded_sends_are_timed_to_their_answer_and_counted_by_kind(peer, batches) -> None:
    meter = EngineMeter()
    link = MeshLink(peer.clock, peer.node, OWN_ID, SECRET, mesh_timeout=MESH_TIMEOUT, endpoint=peer.endpoint,
                    meter=meter)
    link.start()
    peer.endpoint.flush()
    target = peer.client(1, channels=("room",))
    ended: list = []
    link.submit_one(("send", target.client_id, b"a", False), ended.append)
    link.submit([("send", target.client_id, b"b", False), ("publish", "room", b"c", False)], ended.append)
    peer.clock.advance(0.25)  # the answer comes a quarter second later
    peer.endpoint.flush()
    assert ended == [None, [None, (1, 0)]]
    forwarded = {"protocol": "mesh", "scenario": "forward"}
    assert sample_value(meter, "connmix_engine_servers_send_duration_seconds_count", forwarded) == 2
    assert sample_value(meter, "connmix_engine_servers_send_duration_seconds_sum", forwarded) == 0.5
    out = {"direction": "out"}
    assert sample_value(meter, "connmix_engine_mesh_messages_total", {**out, "op": "send"}) == 2
    assert sample_value(meter, "connmix_engine_mesh_messages_total", {**out, "op": "publish"}) == 1
    link.stop()
