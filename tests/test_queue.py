"""Tests for connmix_tx.engine.queue: topics, competing consumers, dispatch timing (docs/queues.md,
docs/api.md "Queue events")."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from connmix_tx.engine.queue import (
    DISPATCH_BATCH,
    RETRY_DELAY,
    QueueError,
    QueueManager,
    valid_name,
)


class FakeConsumer:
    """An API connection as the queues see it: an eligibility switch and a list of deliveries."""

    def __init__(self, name: str, eligible: bool = True) -> None:
        self.name = name
        self.ready = eligible
        self.got: list[tuple[str, str, bytes]] = []

    def eligible(self) -> bool:
        return self.ready

    def deliver(self, topic: str, client_id: str, data: bytes) -> None:
        self.got.append((topic, client_id, data))

    @property
    def data(self) -> list[bytes]:
        return [d for _, _, d in self.got]

    def __repr__(self) -> str:
        return f"FakeConsumer({self.name})"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queues(clock: Clock) -> QueueManager:
    return QueueManager(clock, topic_size=2000, max_topics=100)


def push_many(queues: QueueManager, topic: str, count: int) -> list[bytes]:
    messages = [b'"m%d"' % i for i in range(count)]
    for message in messages:
        queues.push(topic, "1463819408261513216", message)
    return messages


def one_turn(clock: Clock) -> None:
    """Run the calls due now, but not the ones they schedule: one reactor turn.

    ``Clock.advance`` would also run a ``callLater(0)`` made while it runs.
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


# Delivery timing and order -------------------------------------------------------------------


def test_push_then_consume_delivers_in_order_at_the_end_of_the_turn(clock, queues) -> None:
    messages = push_many(queues, "foo", 3)
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo"])
    assert consumer.got == []
    clock.advance(0)
    assert consumer.got == [("foo", "1463819408261513216", m) for m in messages]
    assert queues.length("foo") == 0
    assert queues.delivered == 3


def test_consume_then_push_is_not_delivered_inside_push(clock, queues) -> None:
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo"])
    assert queues.push("foo", "", b'{"msg":"x"}') == 1
    assert consumer.got == []
    clock.advance(0)
    assert consumer.got == [("foo", "", b'{"msg":"x"}')]


def test_push_returns_how_many_wait(queues) -> None:
    assert [queues.push("foo", "", b"1") for _ in range(3)] == [1, 2, 3]
    assert queues.length("foo") == 3
    assert queues.length("nothing") == 0


# Competing consumers -------------------------------------------------------------------------


def test_round_robin_across_three_consumers_in_subscription_order(clock, queues) -> None:
    a, b, c = FakeConsumer("a"), FakeConsumer("b"), FakeConsumer("c")
    for consumer in (a, b, c):
        queues.consume(consumer, ["foo"])
    messages = push_many(queues, "foo", 7)
    clock.advance(0)
    assert a.data == [messages[0], messages[3], messages[6]]
    assert b.data == [messages[1], messages[4]]
    assert c.data == [messages[2], messages[5]]


def test_round_robin_stays_fair_after_a_consumer_leaves(clock, queues) -> None:
    a, b, c = FakeConsumer("a"), FakeConsumer("b"), FakeConsumer("c")
    for consumer in (a, b, c):
        queues.consume(consumer, ["foo"])
    push_many(queues, "foo", 1)
    clock.advance(0)
    assert len(a.got) == 1  # b is next
    queues.unconsume(a)
    messages = push_many(queues, "foo", 2)
    clock.advance(0)
    assert (b.data, c.data) == ([messages[0]], [messages[1]])


def test_ineligible_consumer_is_skipped(clock, queues) -> None:
    a, b, c = FakeConsumer("a"), FakeConsumer("b", eligible=False), FakeConsumer("c")
    for consumer in (a, b, c):
        queues.consume(consumer, ["foo"])
    messages = push_many(queues, "foo", 4)
    clock.advance(0)
    assert a.data == [messages[0], messages[2]]
    assert b.data == []
    assert c.data == [messages[1], messages[3]]


def test_messages_wait_while_nobody_is_eligible_then_go_after_retry_delay(clock, queues) -> None:
    a = FakeConsumer("a", eligible=False)
    queues.consume(a, ["foo"])
    messages = push_many(queues, "foo", 3)
    clock.advance(0)
    assert a.got == [] and queues.length("foo") == 3
    a.ready = True
    clock.advance(RETRY_DELAY / 2)
    assert a.got == []
    clock.advance(RETRY_DELAY / 2)
    assert a.data == messages
    assert queues.length("foo") == 0


def test_consumer_turning_ineligible_mid_batch_leaves_the_rest_waiting(clock, queues) -> None:
    a = FakeConsumer("a")
    original = a.deliver

    def deliver_then_fill_up(topic: str, client_id: str, data: bytes) -> None:
        original(topic, client_id, data)
        a.ready = len(a.got) < 2

    a.deliver = deliver_then_fill_up  # type: ignore[method-assign]
    queues.consume(a, ["foo"])
    messages = push_many(queues, "foo", 5)
    clock.advance(0)
    assert a.data == messages[:2]
    a.ready = True
    a.deliver = original  # type: ignore[method-assign]
    clock.advance(RETRY_DELAY)
    assert a.data == messages


# Capacities and names ------------------------------------------------------------------------


def test_full_topic_refuses_and_stores_nothing(clock) -> None:
    queues = QueueManager(clock, topic_size=2, max_topics=100)
    push_many(queues, "foo", 2)
    with pytest.raises(QueueError, match="^queue full$"):
        queues.push("foo", "", b'"third"')
    assert queues.length("foo") == 2
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo"])
    clock.advance(0)
    assert b'"third"' not in consumer.data and len(consumer.got) == 2
    queues.push("foo", "", b'"room again"')  # delivered ones made room
    assert queues.length("foo") == 1


def test_max_topics_refuses_one_more_topic(clock) -> None:
    queues = QueueManager(clock, topic_size=10, max_topics=2)
    queues.push("a", "", b"1")
    queues.consume(FakeConsumer("x"), ["b"])
    with pytest.raises(QueueError, match="^too many topics$"):
        queues.push("c", "", b"1")
    consumer = FakeConsumer("y")
    with pytest.raises(QueueError, match="^too many topics$"):
        queues.consume(consumer, ["a", "c"])  # all or nothing: not even "a"
    assert set(queues.topics) == {"a", "b"}
    assert queues.consumes(consumer) == []
    queues.consume(consumer, ["a", "b"])  # existing topics are fine
    assert queues.push("a", "", b"2") == 2


@pytest.mark.parametrize(
    "name", ["", " ", "a b", "tab\t", "new\nline", "nul\x00", "del\x7f", "x" * 256, "\u00e9" * 128, 5, None]
)
def test_invalid_names_are_refused(queues, name: object) -> None:
    assert not valid_name(name)
    with pytest.raises(QueueError, match="^invalid topic$"):
        queues.push(name, "", b"1")  # type: ignore[arg-type]
    with pytest.raises(QueueError, match="^invalid topic$"):
        queues.consume(FakeConsumer("a"), ["ok", name])  # type: ignore[list-item]
    assert queues.topics == {}


@pytest.mark.parametrize("name", ["a", "foo.bar-baz:1", "x" * 255, "\u00e9" * 127, "\u961f\u5217"])
def test_valid_names(queues, name: str) -> None:
    assert valid_name(name)
    assert queues.push(name, "", b"1") == 1


def test_consume_of_no_topics_is_invalid(queues) -> None:
    with pytest.raises(QueueError, match="^invalid topic$"):
        queues.consume(FakeConsumer("a"), [])


def test_duplicate_consumption_is_refused_all_or_nothing(queues) -> None:
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo"])
    with pytest.raises(QueueError, match="^duplicate consumption$"):
        queues.consume(consumer, ["bar", "foo"])
    with pytest.raises(QueueError, match="^duplicate consumption$"):
        queues.consume(consumer, ["baz", "baz"])
    assert queues.consumes(consumer) == ["foo"]
    assert "bar" not in queues.topics and "baz" not in queues.topics
    queues.consume(FakeConsumer("b"), ["foo"])  # another connection may consume the same topic


# Unconsume, topic lifetime -------------------------------------------------------------------


def test_unconsume_returns_the_topics(queues) -> None:
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo", "bar"])
    assert queues.unconsume(consumer) == ["foo", "bar"]
    assert queues.consumes(consumer) == []
    assert queues.unconsume(consumer) == []
    assert queues.unconsume(FakeConsumer("never")) == []


def test_waiting_messages_survive_unconsume_and_go_to_the_next_consumer_once(clock, queues) -> None:
    a = FakeConsumer("a", eligible=False)
    queues.consume(a, ["foo"])
    messages = push_many(queues, "foo", 3)
    clock.advance(0)  # a is busy: the messages wait
    queues.unconsume(a)
    clock.advance(RETRY_DELAY * 4)
    b = FakeConsumer("b")
    queues.consume(b, ["foo"])
    clock.advance(0)
    clock.advance(RETRY_DELAY * 4)
    assert a.got == []
    assert b.data == messages


def test_unconsume_before_the_dispatch_turn_loses_nothing(clock, queues) -> None:
    a, b = FakeConsumer("a"), FakeConsumer("b")
    queues.consume(a, ["foo"])
    messages = push_many(queues, "foo", 3)
    queues.unconsume(a)  # same turn: nothing was written to a yet
    clock.advance(0)
    queues.consume(b, ["foo"])
    clock.advance(0)
    assert a.got == [] and b.data == messages


def test_topic_removed_when_empty_and_unconsumed(clock, queues) -> None:
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["idle"])
    assert "idle" in queues.topics
    queues.unconsume(consumer)
    assert "idle" not in queues.topics

    queues.push("busy", "", b"1")
    queues.consume(consumer, ["busy"])
    clock.advance(0)
    assert "busy" in queues.topics  # empty but consumed
    queues.unconsume(consumer)
    assert "busy" not in queues.topics


def test_topic_with_waiting_messages_stays_without_consumer(clock, queues) -> None:
    consumer = FakeConsumer("a", eligible=False)
    queues.consume(consumer, ["foo"])
    queues.push("foo", "", b"1")
    queues.unconsume(consumer)
    clock.advance(0)
    assert queues.length("foo") == 1


def test_no_polling_once_the_last_consumer_left(clock, queues) -> None:
    consumer = FakeConsumer("a")
    queues.consume(consumer, ["foo"])
    queues.push("foo", "", b"1")
    queues.unconsume(consumer)  # the dispatch scheduled by push is still pending
    clock.advance(0)
    clock.advance(RETRY_DELAY * 10)
    # Nothing can be delivered until a consumer arrives, and consume() schedules a dispatch.
    assert clock.getDelayedCalls() == []


# Batching ------------------------------------------------------------------------------------


def test_at_most_256_messages_per_topic_per_turn(clock, queues) -> None:
    consumer = FakeConsumer("a")
    messages = push_many(queues, "foo", 600)
    other = push_many(queues, "bar", 10)
    queues.consume(consumer, ["foo", "bar"])
    one_turn(clock)
    assert DISPATCH_BATCH == 256
    assert consumer.data.count(b'"m0"') == 2  # one from each topic
    assert len([t for t, _, _ in consumer.got if t == "foo"]) == 256
    assert len([t for t, _, _ in consumer.got if t == "bar"]) == 10
    one_turn(clock)
    assert len(consumer.got) == 512 + 10
    one_turn(clock)
    assert [d for t, _, d in consumer.got if t == "foo"] == messages
    assert [d for t, _, d in consumer.got if t == "bar"] == other
    assert clock.getDelayedCalls() == []


def test_stop_cancels_scheduled_dispatch(clock, queues) -> None:
    consumer = FakeConsumer("a", eligible=False)
    queues.consume(consumer, ["foo", "bar"])
    queues.push("foo", "", b"1")
    clock.advance(0)  # blocked: a retry is pending
    queues.push("bar", "", b"2")  # and a dispatch
    assert len(clock.getDelayedCalls()) == 2
    queues.stop()
    assert clock.getDelayedCalls() == []


def test_configure_keeps_waiting_messages(clock, queues) -> None:
    push_many(queues, "foo", 5)
    queues.configure(topic_size=2, max_topics=1)
    assert queues.length("foo") == 5
    with pytest.raises(QueueError, match="^queue full$"):
        queues.push("foo", "", b"1")
    with pytest.raises(QueueError, match="^too many topics$"):
        queues.push("bar", "", b"1")
