"""Manual acknowledgement on the memory backend (docs/queues.md): the ack / redelivery state
machine of connmix_tx.engine.queue on a Clock, and ``queue.ack`` / manual ``queue.consume`` in
both API dialects (connmix_tx.engine.api)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from connmix_tx.engine.api import ApiDispatcher, ApiSession
from connmix_tx.engine.connections import ConnectionRegistry
from connmix_tx.engine.queue import QueueError, QueueManager
from connmix_tx.engine.router import LocalOps, Router

NODE_ID = "c8u7jfbin5659oh0b13g"


class Consumer:
    """A consumer recording (data, message_id, redelivered) of each delivery."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.got: list[tuple[bytes, str | None, int]] = []

    def eligible(self) -> bool:
        return self.ready

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        self.got.append((data, message_id, redelivered))

    def ids(self) -> list[str]:
        return [i for _, i, _ in self.got if i is not None]


class Meter:
    def __init__(self) -> None:
        self.acks: dict[str, int] = {}
        self.redeliveries: dict[str, int] = {}
        self.pushes: list[tuple[str, str]] = []

    def pushed(self, topic: str, result: str) -> None:
        self.pushes.append((topic, result))

    def acked(self, topic: str, count: int) -> None:
        self.acks[topic] = self.acks.get(topic, 0) + count

    def redelivered(self, topic: str, count: int) -> None:
        self.redeliveries[topic] = self.redeliveries.get(topic, 0) + count


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def meter() -> Meter:
    return Meter()


@pytest.fixture
def queues(clock: Clock, meter: Meter) -> QueueManager:
    return QueueManager(clock, topic_size=5, max_topics=10, ack_timeout=30, meter=meter)


def push(queues: QueueManager, topic: str, *values: int) -> None:
    for value in values:
        queues.push(topic, "1", b"%d" % value)


def test_manual_events_carry_unique_ids_and_stay_unacked(clock, queues) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1, 2, 3)
    clock.advance(0)
    assert [(d, r) for d, _, r in c.got] == [(b"1", 0), (b"2", 0), (b"3", 0)]
    assert len(set(c.ids())) == 3
    assert queues.unacked == 3 and queues.length("foo") == 0


def test_ack_counts_only_held_ids_and_frees_them(clock, queues, meter) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1, 2)
    clock.advance(0)
    first, second = c.ids()
    assert queues.ack(c, "foo", [first, "nope", first]) == 1
    assert queues.ack(c, "foo", [first]) == 0  # already acknowledged: not an error, not counted
    assert queues.unacked == 1 and meter.acks == {"foo": 1}
    clock.advance(60)  # only the unacknowledged one comes back
    assert c.got[-1] == (b"2", second, 1)


def test_ack_of_a_topic_not_consumed_is_refused(clock, queues) -> None:
    c = Consumer()
    with pytest.raises(QueueError):
        queues.ack(c, "foo", ["1"])


def test_ack_timeout_redelivers_at_the_head_of_the_line(clock, queues, meter) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1)
    clock.advance(0)
    queues.ack(c, "foo", [])  # nothing
    clock.advance(29)
    push(queues, "foo", 2)
    clock.advance(0)
    assert [d for d, _, _ in c.got] == [b"1", b"2"]
    c.ready = False
    push(queues, "foo", 3)
    clock.advance(1.5)  # "1" is overdue (30 s), "2" not yet
    c.ready = True
    clock.advance(0.1)
    assert [(d, r) for d, _, r in c.got[2:]] == [(b"1", 1), (b"3", 0)]  # redelivery first
    assert meter.redeliveries == {"foo": 1}
    clock.advance(30)
    assert sorted(r for _, _, r in c.got) == [0, 0, 0, 1, 1, 1, 2]  # 2 and 3 once, 1 twice


def test_late_ack_after_timeout_does_not_count(clock, queues) -> None:
    a, b = Consumer(), Consumer()
    queues.consume(a, ["foo"], manual=True)
    push(queues, "foo", 1)
    clock.advance(0)
    queues.consume(b, ["foo"], manual=True)
    a.ready = False  # a is busy: the redelivery goes to b
    clock.advance(30)
    [old] = a.ids()
    assert b.got == [(b"1", old, 1)]
    assert queues.ack(a, "foo", [old]) == 0  # a no longer holds it
    assert queues.ack(b, "foo", [old]) == 1


def test_unconsume_redelivers_to_the_other_consumer_in_order(clock, queues) -> None:
    a, b = Consumer(), Consumer(ready=False)
    queues.consume(a, ["foo"], manual=True)
    queues.consume(b, ["foo"], manual=True)
    push(queues, "foo", 1, 2, 3)
    clock.advance(0)
    assert [d for d, _, _ in a.got] == [b"1", b"2", b"3"]
    b.ready = True
    queues.ack(a, "foo", [a.ids()[1]])
    push(queues, "foo", 4)
    assert queues.unconsume(a) == ["foo"]
    clock.advance(0)
    assert [(d, r) for d, _, r in b.got] == [(b"1", 1), (b"3", 1), (b"4", 0)]


def test_auto_consumer_takes_redeliveries_without_ids(clock, queues) -> None:
    a, b = Consumer(), Consumer()
    queues.consume(a, ["foo"], manual=True)
    push(queues, "foo", 1)
    clock.advance(0)
    queues.consume(b, ["foo"])  # auto-ack
    queues.unconsume(a)
    clock.advance(0)
    assert b.got == [(b"1", None, 0)]
    assert queues.unacked == 0 and queues.topics["foo"].unacked == {}


def test_unacked_cap_is_backpressure_not_loss(clock, queues) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", *range(5))
    clock.advance(0)
    push(queues, "foo", *range(5, 10))  # the topic holds 5 unacked and 5 waiting
    clock.advance(1)
    assert len(c.got) == 5 and queues.length("foo") == 5
    with pytest.raises(QueueError, match="queue full"):
        queues.push("foo", "1", b"10")
    queues.ack(c, "foo", c.ids()[:2])
    clock.advance(0)
    assert [d for d, _, _ in c.got] == [b"%d" % i for i in range(7)]
    queues.ack(c, "foo", c.ids())
    clock.advance(0)
    assert [d for d, _, _ in c.got] == [b"%d" % i for i in range(10)]


def test_topic_with_unacked_messages_is_kept_and_removed_after_ack(clock, queues) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1)
    clock.advance(0)
    queues.ack(c, "foo", c.ids())
    queues.unconsume(c)
    assert "foo" not in queues.topics


def test_no_timer_left_once_everything_is_acknowledged(clock, queues) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1)
    clock.advance(0)
    queues.ack(c, "foo", c.ids())
    clock.advance(30)  # the expiry check runs once, finds nothing, schedules nothing
    assert clock.getDelayedCalls() == []
    assert c.got == [(b"1", "1", 0)]


def test_hot_ack_timeout_applies_to_new_deliveries(clock, queues) -> None:
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    queues.configure(5, 10, ack_timeout=2)
    push(queues, "foo", 1)
    clock.advance(0)
    clock.advance(2)
    clock.advance(0)
    assert [r for _, _, r in c.got] == [0, 1]


# The API, both dialects ------------------------------------------------------------------------


class Api:
    def __init__(self) -> None:
        self.clock = Clock()
        self.queues = QueueManager(self.clock, topic_size=100, max_topics=10, ack_timeout=30)
        self.dispatcher = ApiDispatcher(Router(0, LocalOps(ConnectionRegistry()), None), self.queues)
        self.written: list[bytes] = []
        self.session = ApiSession(self.written.append, lambda: 0, NODE_ID, "127.0.0.1:1")

    def call(self, body: dict) -> Any:
        return json.loads(self.dispatcher.handle(self.session, json.dumps(body).encode()))

    def events(self) -> list[dict]:
        out, self.written[:] = [json.loads(w) for w in self.written], []
        return out


def test_long_manual_consume_events_and_ack() -> None:
    api = Api()
    reply = api.call({"method": "queue.consume", "params": [{"queues": ["foo"], "ack": "manual"}], "id": 1})
    assert reply == {"error": None, "result": {"success": True}, "id": 1}
    api.queues.push("foo", "1463819408261513216", b'{"msg":"x"}')
    api.clock.advance(0)
    [event] = api.events()
    result = event["result"]
    assert event["event"] == "queue.consume" and "redelivered" not in result
    assert result["data"] == {"msg": "x"} and result["queue"] == "foo" and result["node_id"] == NODE_ID
    message_id = result["message_id"]
    assert isinstance(message_id, str)
    reply = api.call({"method": "queue.ack", "params": [{"queue": "foo", "ids": [message_id, "zz"]}], "id": 2})
    assert reply == {"error": None, "result": {"acked": 1, "success": True}, "id": 2}
    api.clock.advance(31)
    assert api.events() == []  # acknowledged: never again


def test_long_redelivered_event_after_timeout() -> None:
    api = Api()
    api.call({"method": "queue.consume", "params": [{"queues": ["foo"], "ack": "manual"}], "id": 1})
    api.queues.push("foo", "", b"1")
    api.clock.advance(0)
    first = api.events()[0]["result"]
    api.clock.advance(30)
    again = api.events()[0]["result"]
    assert again["message_id"] == first["message_id"] and again["redelivered"] == 1


def test_compact_manual_pop_events_and_ack() -> None:
    api = Api()
    reply = api.call({"m": "queue.pop", "p": {"t": ["foo"], "a": "manual"}, "i": 1})
    assert reply == {"E": None, "r": {"s": True}, "i": 1}
    api.queues.push("foo", "7", b'"x"')
    api.clock.advance(0)
    [event] = api.events()
    assert event["e"] == "queue.pop" and set(event["p"]) == {"n", "c", "t", "i", "d"}
    api.clock.advance(30)
    [event] = api.events()
    assert event["p"]["r"] == 1
    reply = api.call({"m": "queue.ack", "p": {"t": "foo", "i": [event["p"]["i"]]}, "i": 2})
    assert reply == {"E": None, "r": {"n": 1, "s": True}, "i": 2}


def test_seed_consume_stays_auto_ack_without_ids() -> None:
    api = Api()
    api.call({"method": "queue.consume", "params": ["foo"], "id": 1})
    api.queues.push("foo", "1463819408261513216", b'{"ctx":[],"msg":"foo"}')
    api.clock.advance(0)
    assert api.written == [
        b'{"event":"queue.consume","result":{"client_id":"1463819408261513216","data":{"ctx":[],"msg":"foo"},'
        b'"node_id":"c8u7jfbin5659oh0b13g","queue":"foo"},"id":null}'
    ]
    assert api.queues.unacked == 0
    reply = api.call({"method": "queue.ack", "params": [{"queue": "foo", "ids": ["1"]}], "id": 2})
    assert reply == {"error": None, "result": {"acked": 0, "success": True}, "id": 2}


@pytest.mark.parametrize("params", [
    [{"queues": ["foo"], "ack": "sometimes"}],
    [{"queues": "foo", "ack": "manual"}],
    [{"queues": [], "ack": "manual"}],
    [{"queues": ["bad topic"], "ack": "manual"}],
    [{"queues": ["foo"], "ack": "manual", "extra": 1}],
])
def test_bad_manual_consume_params_are_101(params) -> None:
    api = Api()
    reply = api.call({"method": "queue.consume", "params": params, "id": 1})
    assert reply["error"]["code"] == 101
    assert api.queues.consumes(api.session) == []


@pytest.mark.parametrize("params", [
    [], [{}], [{"queue": "foo"}], [{"queue": "foo", "ids": []}], [{"queue": "foo", "ids": [1]}],
    [{"queue": "", "ids": ["1"]}], [{"queue": "foo", "ids": "1"}], ["foo"],
    [{"queue": "foo", "ids": ["1"] * 10001}],
])
def test_bad_ack_params_are_101(params) -> None:
    api = Api()
    api.call({"method": "queue.consume", "params": [{"queues": ["foo"], "ack": "manual"}], "id": 1})
    assert api.call({"method": "queue.ack", "params": params, "id": 2})["error"]["code"] == 101


def test_ack_of_a_topic_this_connection_does_not_consume_is_201() -> None:
    api = Api()
    reply = api.call({"method": "queue.ack", "params": [{"queue": "foo", "ids": ["1"]}], "id": 2})
    assert reply["error"]["code"] == 201
    reply = api.call({"m": "queue.ack", "p": {"t": "foo", "i": ["1"]}, "i": 3})
    assert reply["E"]["c"] == 201


def test_disconnect_of_a_manual_consumer_redelivers_to_another_session() -> None:
    api = Api()
    api.call({"method": "queue.consume", "params": [{"queues": ["foo"], "ack": "manual"}], "id": 1})
    api.queues.push("foo", "", b"1")
    api.clock.advance(0)
    first = api.events()[0]["result"]
    other_written: list[bytes] = []
    other = ApiSession(other_written.append, lambda: 0, NODE_ID, "127.0.0.1:2")
    api.dispatcher.handle(other, b'{"m":"queue.pop","p":{"t":["foo"],"a":"manual"},"i":1}')
    api.queues.unconsume(api.session)  # what the API server does when the connection closes
    api.clock.advance(0)
    event = json.loads(other_written[-1])
    assert event["p"]["i"] == first["message_id"] and event["p"]["r"] == 1


def test_engine_metrics_count_acks_and_redeliveries(clock) -> None:
    from connmix_tx.metrics import EngineMeter
    from connmix_tx.testing import metrics_text

    metrics = EngineMeter()
    queues = QueueManager(clock, topic_size=5, max_topics=10, ack_timeout=1, meter=metrics)
    c = Consumer()
    queues.consume(c, ["foo"], manual=True)
    push(queues, "foo", 1, 2)
    clock.advance(0)
    queues.ack(c, "foo", c.ids()[:1])
    clock.advance(1)
    text = metrics_text(metrics)
    assert 'connmix_engine_queue_acks_total{topic="foo"} 1.0' in text
    assert 'connmix_engine_queue_redeliveries_total{topic="foo"} 1.0' in text
    assert 'connmix_engine_queue_push_total{result="ok",topic="foo"} 2.0' in text
