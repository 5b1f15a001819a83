"""Queues across the workers of one engine (connmix_tx/engine/siblings.py), on a Clock.

Two workers, W (holds the API connection) and S (its sibling), each with its own ``QueueManager``,
joined by fake mesh links that carry the sibling ops through msgpack and the real mesh point
(``apply_op``) and answer only when the test pumps them.  The API connection is a real
``ApiSession`` writing into a list.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import msgpack
import pytest
from twisted.internet.task import Clock

from connmix_tx.engine.api import COMPACT, ApiSession
from connmix_tx.engine.connections import ConnectionRegistry
from connmix_tx.engine.mesh import apply_op
from connmix_tx.engine.mesh_link import _result
from connmix_tx.engine.queue import RETRY_DELAY, QueueError, QueueManager
from connmix_tx.engine.router import LocalOps
from connmix_tx.engine.siblings import IN_FLIGHT, RESEND_DELAY, PusherNodeIds, SiblingQueues

W_ID, S_ID, S2_ID = "w0node00000000000000", "w1node00000000000000", "w1again0000000000000"


class Local:
    """What the mesh point hands ops to: only ``siblings`` matters here."""

    def __init__(self, siblings: SiblingQueues) -> None:
        self.siblings = siblings


class FakeLink:
    """A mesh link to ``target``: ``submit`` queues, ``pump`` answers, ``lose`` fails what waits."""

    def __init__(self, target: SiblingQueues) -> None:
        self.target = target
        self.state = "up"
        self.waiting: list[tuple[list[tuple], Callable[[list], Any]]] = []
        self.sent: list[tuple] = []

    def submit(self, ops: list[tuple], done: Callable[[list], Any]) -> None:
        if self.state == "down":
            done(["node unavailable"] * len(ops))
            return
        self.sent.extend(ops)
        self.waiting.append((ops, done))

    def pump(self) -> int:
        """Answer every waiting submission through the wire format; return how many ops."""
        count = 0
        while self.waiting:
            ops, done = self.waiting.pop(0)
            results = []
            for op in ops:
                wire = msgpack.unpackb(msgpack.packb([op[0], 7, *op[1:]], use_bin_type=True), raw=False)
                seq, status, a, b = msgpack.unpackb(msgpack.packb(apply_op(Local(self.target), wire)), raw=False)
                results.append(None if status == 0 else _result(op[0], status, a, b))
            count += len(ops)
            done(results)
        return count

    def lose(self) -> None:
        self.state = "down"
        waiting, self.waiting = self.waiting, []
        for ops, done in waiting:
            done(["node unavailable"] * len(ops))

    def kinds(self) -> list[str]:
        return [op[0] for op in self.sent]


class Session(ApiSession):
    """A real API session whose writes land in ``frames``; ``buffered`` is set by the test."""

    def __init__(self, node_id: str = W_ID) -> None:
        self.frames: list[dict] = []
        self.buffer = 0
        super().__init__(lambda raw: self.frames.append(json.loads(raw)), lambda: self.buffer, node_id)

    def events(self) -> list[dict]:
        got = [f["result"] for f in self.frames if f.get("event") == "queue.consume"]
        self.frames.clear()
        return got


class Pair:
    """Worker W and its sibling S (worker 1), linked both ways."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.w_queues = QueueManager(clock, topic_size=2000)
        self.s_queues = QueueManager(clock, topic_size=2000)
        self.links: dict[tuple[str, str], FakeLink] = {}
        self.w = SiblingQueues(self.w_queues, W_ID, clock, lambda node: self.links.get((W_ID, node)))
        self.s = SiblingQueues(self.s_queues, S_ID, clock, lambda node: self.links.get((S_ID, node)))
        self.to_s = self.links[W_ID, S_ID] = FakeLink(self.s)
        self.to_w = self.links[S_ID, W_ID] = FakeLink(self.w)
        self.s.update([{"id": W_ID, "worker": 0, "number": 0}])
        self.w.update([{"id": S_ID, "worker": 1, "number": 1}])

    def turn(self, rounds: int = 3) -> None:
        """Run the reactor turns and answer the links until nothing moves."""
        for _ in range(rounds):
            self.clock.advance(0)
            self.clock.advance(0)
            self.to_s.pump()
            self.to_w.pump()

    def push(self, queues: QueueManager, texts: list[str], client_id: str = "cid") -> None:
        for text in texts:
            queues.push("foo", client_id, json.dumps(text).encode())


def texts(events: list[dict]) -> list[str]:
    return [e["data"] for e in events]


@pytest.fixture
def pair() -> Pair:
    return Pair(Clock())


def test_one_consumer_gets_the_messages_of_both_workers_naming_the_pushing_worker(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    assert pair.to_s.kinds() == ["consume"]
    pair.push(pair.s_queues, ["s1", "s2"])
    pair.push(pair.w_queues, ["w1"])
    pair.turn()
    got = session.events()
    assert sorted(texts(got)) == ["s1", "s2", "w1"]
    assert {e["data"]: e["node_id"] for e in got} == {"s1": S_ID, "s2": S_ID, "w1": W_ID}
    assert all("message_id" not in e for e in got)  # auto: the seed's event, unchanged
    # Written is done on S: nothing held, nothing waiting.
    assert pair.s_queues.unacked == 0 and pair.s_queues.length("foo") == 0
    # The session's own node id is back for W's own events.
    pair.push(pair.w_queues, ["w2"])
    pair.turn()
    assert [e["node_id"] for e in session.events()] == [W_ID]


def test_at_most_256_events_in_flight_per_consumption(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    pair.push(pair.s_queues, [f"m{i}" for i in range(600)])
    for _ in range(5):  # the link never answers: S sends 256 and waits
        pair.clock.advance(0)
    assert len(pair.to_w.sent) == IN_FLIGHT
    assert pair.s_queues.length("foo") == 600 - IN_FLIGHT
    assert session.events() == []
    assert pair.to_w.pump() == IN_FLIGHT  # answered: the next 256 go
    pair.clock.advance(RETRY_DELAY)
    pair.clock.advance(0)
    assert len(pair.to_w.sent) == 2 * IN_FLIGHT
    pair.turn(6)
    for _ in range(4):
        pair.clock.advance(RETRY_DELAY)
        pair.turn()
    assert texts(session.events()) == [f"m{i}" for i in range(600)]  # all, in order


def test_a_busy_consumer_pauses_the_sibling_without_losing_what_was_sent(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    session.buffer = 10 * 1024 * 1024  # the consumer reads nothing
    pair.push(pair.s_queues, [f"m{i}" for i in range(300)])
    pair.turn()
    assert len(session.events()) == IN_FLIGHT  # what was on its way is written
    for _ in range(5):
        pair.turn()
    assert session.events() == []  # answered busy: S sends no more
    assert pair.s_queues.length("foo") == 300 - IN_FLIGHT
    session.buffer = 0
    pair.clock.advance(RETRY_DELAY)
    pair.turn()
    assert texts(session.events()) == [f"m{i}" for i in range(IN_FLIGHT, 300)]


def test_events_in_flight_when_the_consumer_leaves_go_back_to_the_head(pair: Pair) -> None:
    first = Session()
    pair.w.consume(first, ["foo"])
    pair.turn()
    pair.push(pair.s_queues, [f"m{i}" for i in range(10)])
    pair.clock.advance(0)
    pair.clock.advance(0)
    assert len(pair.to_w.waiting) == 1  # ten events on their way to W
    pair.w.unconsume(first)  # the connection closes before they arrive
    pair.to_w.pump()  # answered gone
    assert first.events() == []
    pair.to_s.pump()  # the unconsume op: already gone
    assert pair.s.proxies == {}
    assert pair.s_queues.length("foo") == 10
    second = Session()
    pair.w.consume(second, ["foo"])
    pair.push(pair.s_queues, ["m10"])
    pair.turn()
    assert texts(second.events()) == [f"m{i}" for i in range(11)]  # nothing lost, order kept


def test_a_consumer_leaving_mid_stream_loses_nothing_that_was_not_written(pair: Pair) -> None:
    first = Session()
    pair.w.consume(first, ["foo"])
    pair.turn()
    pair.push(pair.s_queues, [f"m{i}" for i in range(600)])
    pair.push(pair.w_queues, [f"w{i}" for i in range(50)])
    pair.turn(1)
    pair.clock.advance(0)
    pair.clock.advance(0)  # some written, some on their way
    pair.w.unconsume(first)
    got_first = texts(first.events())
    second = Session()
    pair.w.consume(second, ["foo"])
    for _ in range(6):
        pair.clock.advance(RETRY_DELAY)
        pair.turn()
    got_second = texts(second.events())
    union = got_first + got_second
    assert sorted(union) == sorted([f"m{i}" for i in range(600)] + [f"w{i}" for i in range(50)])
    assert len(set(union)) == len(union)


def test_a_lost_link_hands_the_events_back_and_they_come_once_it_is_up(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    pair.push(pair.s_queues, ["a", "b", "c"])
    pair.clock.advance(0)
    pair.clock.advance(0)
    pair.to_w.lose()  # S -> W lost with three events on it
    assert pair.s_queues.length("foo") == 3  # back at the head of S's topic
    other = Session(S_ID)  # a consumer on S meanwhile: it gets them, the proxy is not eligible
    pair.s.consume(other, ["foo"])
    pair.turn()
    assert texts(other.events()) == ["a", "b", "c"]
    assert session.events() == []
    pair.s.unconsume(other)
    pair.to_w.state = "up"
    pair.clock.advance(RETRY_DELAY)
    pair.push(pair.s_queues, ["d"])
    pair.turn()
    assert texts(session.events()) == ["d"]


def test_manual_acks_reach_the_worker_that_holds_each_message(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    pair.push(pair.s_queues, ["s1", "s2"])
    pair.push(pair.w_queues, ["w1"])
    pair.turn()
    got = {e["data"]: e for e in session.events()}
    assert got["s1"]["message_id"] == "w1:1" and got["s2"]["message_id"] == "w1:2"
    assert got["w1"]["message_id"] == "1"
    assert pair.s_queues.unacked == 2  # written, but held until the consumer says so
    assert pair.w.ack(session, "foo", ["w1:1", "1", "w1:99", "nope"]) == 2
    pair.turn()
    assert pair.s_queues.unacked == 1 and pair.w_queues.unacked == 0
    assert pair.w.ack(session, "foo", ["w1:1"]) == 0  # already acknowledged
    # Another connection cannot acknowledge what this one holds.
    thief = Session()
    pair.w.consume(thief, ["foo"], manual=True)
    assert pair.w.ack(thief, "foo", ["w1:2", "w1:1"]) == 0
    pair.turn()
    assert pair.s_queues.unacked == 1
    pair.w.unconsume(thief)
    pair.turn()
    with pytest.raises(QueueError):
        pair.w.ack(session, "bar", ["w1:2"])
    # The unacknowledged one comes again after the consumer leaves, with its count.
    pair.w.unconsume(session)
    pair.turn()
    assert pair.s_queues.unacked == 0 and pair.s_queues.length("foo") == 1
    again = Session()
    pair.w.consume(again, ["foo"], manual=True)
    pair.turn()
    [event] = again.events()
    assert (event["data"], event["message_id"], event["redelivered"]) == ("s2", "w1:2", 1)


def test_a_manual_message_not_acknowledged_in_time_comes_again(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    pair.push(pair.s_queues, ["s1"])
    pair.turn()
    assert [e["message_id"] for e in session.events()] == ["w1:1"]
    pair.clock.advance(pair.s_queues.ack_timeout)
    pair.turn()
    [event] = session.events()
    assert (event["message_id"], event["redelivered"]) == ("w1:1", 1)
    assert pair.w.ack(session, "foo", ["w1:1"]) == 1
    pair.turn()
    assert pair.s_queues.unacked == 0


def test_a_restarted_sibling_gets_the_open_consumptions_again(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    pair.push(pair.s_queues, ["old"])
    pair.turn()
    assert [e["message_id"] for e in session.events()] == ["w1:1"]
    # Worker 1 is restarted: a new node with the same index; the old one leaves the list.
    s2_queues = QueueManager(pair.clock)
    s2 = SiblingQueues(s2_queues, S2_ID, pair.clock, lambda node: pair.links.get((S2_ID, node)))
    pair.links[W_ID, S2_ID] = to_s2 = FakeLink(s2)
    pair.links[S2_ID, W_ID] = to_w2 = FakeLink(pair.w)
    pair.w.update([{"id": S2_ID, "worker": 1, "number": 2}])
    assert pair.w.ack(session, "foo", ["w1:1"]) == 0  # held by the node that left: not counted
    pair.clock.advance(0)
    to_s2.pump()  # S2 does not know W yet: refused, sent again later
    assert s2.proxies == {}
    s2.update([{"id": W_ID, "worker": 0, "number": 0}])
    pair.clock.advance(RESEND_DELAY)
    to_s2.pump()
    assert list(s2.proxies) == [(W_ID, 1)]
    s2_queues.push("foo", "cid", b'"new"')
    pair.clock.advance(0)
    pair.clock.advance(0)
    to_w2.pump()
    [event] = session.events()
    assert (event["data"], event["node_id"], event["message_id"]) == ("new", S2_ID, "w1:1")
    assert pair.w.ack(session, "foo", ["w1:1"]) == 1
    to_s2.pump()
    assert s2_queues.unacked == 0


def test_an_owner_leaving_the_node_list_takes_its_proxies_and_hands_back_what_they_held(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    pair.push(pair.s_queues, ["s1"])
    pair.turn()
    assert pair.s_queues.unacked == 1
    pair.s.update([])  # W left (killed): its consumption on S goes
    assert pair.s.proxies == {}
    assert pair.s_queues.unacked == 0 and pair.s_queues.length("foo") == 1


def test_sibling_ops_from_strangers_and_bad_ops_are_refused(pair: Pair) -> None:
    local = Local(pair.s)
    # A consume from a node that is not a sibling: refused (retryable), nothing registered.
    reply = apply_op(local, ["consume", 1, "stranger000000000000", 1, ["foo"], False])
    assert reply[1] != 0 and pair.s.proxies == {}
    assert apply_op(local, ["consume", 2, W_ID, 1, ["bad topic"], False])[1] != 0
    assert apply_op(local, ["consume", 3, W_ID, 1, [], False])[1] != 0
    # An event for a consumption that does not exist: gone.
    assert apply_op(Local(pair.w), ["event", 4, 99, "foo", "cid", S_ID, b"1", None, 0])[1:3] == [1, "gone"]
    # An ack for a proxy that does not exist counts nothing; unconsume of nothing is fine.
    assert apply_op(local, ["ack", 5, W_ID, 42, "foo", ["1"]])[1] == 0
    assert apply_op(local, ["unconsume", 6, W_ID, 42])[1] == 0
    # A mesh point without sibling queues (a one-process engine) refuses them.
    assert apply_op(LocalOps(ConnectionRegistry()), ["consume", 7, W_ID, 1, ["foo"], False])[1] == 4


def test_a_consume_refused_by_the_local_queues_reaches_no_sibling(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    with pytest.raises(QueueError):
        pair.w.consume(session, ["foo"])  # duplicate
    pair.turn()
    assert pair.to_s.kinds() == ["consume"]
    assert pair.w.unconsume(session) == ["foo"]
    pair.turn()
    assert pair.to_s.kinds() == ["consume", "unconsume"]
    assert pair.s.proxies == {}


class RecordingQueues:
    """A stand-in for the redis manager: records its consumers and delivers on demand."""

    def __init__(self) -> None:
        self.consumers: list[Any] = []

    def consume(self, consumer: Any, topics: list[str], manual: bool = False) -> None:
        self.consumers.append(consumer)

    def unconsume(self, consumer: Any) -> list[str]:
        self.consumers.remove(consumer)
        return ["foo"]


def test_redis_events_name_the_worker_whose_client_pushed() -> None:
    queues = RecordingQueues()
    names = PusherNodeIds(queues, W_ID)  # type: ignore[arg-type]
    names.update([{"id": W_ID, "number": 3}, {"id": S_ID, "number": 5}])
    session = Session()
    names.consume(session, ["foo"])
    [consumer] = queues.consumers
    from_s = str((1 << 22) | (5 << 12) | 1)  # a client id of node number 5
    consumer.deliver("foo", from_s, b"1")
    consumer.deliver("foo", "", b"2")  # pushed outside any connection: this worker
    consumer.deliver("foo", str((1 << 22) | (9 << 12)), b"3", message_id="1-0")  # a node not listed
    assert [(e["node_id"], e["data"]) for e in session.events()] == [(S_ID, 1), (W_ID, 2), (W_ID, 3)]
    assert names.unconsume(session) == ["foo"] and queues.consumers == []
    assert names.unconsume(session) == []


def test_an_event_answered_gone_ends_the_proxy_even_when_the_unconsume_op_was_lost(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    pair.push(pair.s_queues, ["a", "b"])
    pair.clock.advance(0)
    pair.clock.advance(0)
    pair.to_s.lose()  # W -> S is down: the unconsume op cannot reach S
    pair.w.unconsume(session)
    pair.to_w.pump()  # S -> W still up: both answered gone
    assert pair.s.proxies == {}
    assert pair.s_queues.length("foo") == 2
    local = Session(S_ID)
    pair.s.consume(local, ["foo"])
    pair.clock.advance(0)
    assert texts(local.events()) == ["a", "b"]


def test_ids_of_a_manual_consumer_are_bounded_when_siblings_redeliver_elsewhere(pair: Pair) -> None:
    pair.w_queues.topic_size = pair.s_queues.topic_size = 5
    session = Session()
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    for round_ in range(6):  # each round: 5 delivered, never acked, taken back by S's timeout
        pair.push(pair.s_queues, [f"m{round_}.{i}" for i in range(5)])
        pair.turn()
        assert len(session.events()) == 5
        pair.to_w.state = "connecting"  # the proxy cannot take them again for now
        pair.clock.advance(pair.s_queues.ack_timeout)
        other = Session(S_ID)  # ... and they are redelivered to a consumer on S, which is done
        pair.s.consume(other, ["foo"])
        pair.clock.advance(0)
        assert len(other.events()) == 5
        pair.s.unconsume(other)
        pair.to_w.state = "up"
        pair.turn()
    assert len(pair.w._held[session]["foo"]) <= 2 * 5


def test_compact_consumers_get_compact_events_naming_the_sibling(pair: Pair) -> None:
    session = Session()
    session.started(["foo"], COMPACT)
    pair.w.consume(session, ["foo"], manual=True)
    pair.turn()
    pair.push(pair.s_queues, ["s1"])
    pair.turn()
    [frame] = session.frames
    assert frame == {"e": "queue.pop", "p": {"n": S_ID, "c": "cid", "t": "foo", "i": "w1:1", "d": "s1"}}


def test_an_owner_refusing_every_event_does_not_make_the_sibling_spin(pair: Pair) -> None:
    session = Session()
    pair.w.consume(session, ["foo"])
    pair.turn()
    pair.w._event = lambda *args: (4, "bad request: broken")  # type: ignore[method-assign]
    pair.push(pair.s_queues, ["a"])
    for _ in range(20):
        pair.turn()
    assert len(pair.to_w.sent) == 1  # sent once, refused, back at the head, paused
    assert pair.s_queues.length("foo") == 1
    del pair.w._event
    pair.clock.advance(RETRY_DELAY)
    pair.turn()
    assert texts(session.events()) == ["a"]
