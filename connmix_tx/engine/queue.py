"""Topics with competing consumers, auto or manual acknowledgement (docs/queues.md).

Lua pushes serialised messages into a topic of this engine; API connections consume topics.  Each
message goes to exactly one consumer, round robin over the consumers that are *eligible* (their
outbound buffer is small enough).  Messages wait while nobody can take them, up to the topic's
capacity; a push to a full topic is refused, never dropped silently.  Delivery happens at the end
of the reactor turn, never inside the pushing Lua call.

A consumer is *auto-ack* (a message is done once written to it, at most once) or *manual* (the
message carries an id and stays *unacknowledged* until ``ack``; at least once).  An unacknowledged
message whose consumer leaves, or that is not acknowledged within ``ack_timeout`` seconds, goes
back to the head of its topic's line and is delivered again with its ``redelivered`` count.  At
most ``topic_size`` messages of a topic may be unacknowledged at once: beyond that the topic stops
delivering until acks arrive (backpressure, not loss).

``QueueManager`` is the ``memory`` backend and the local dispatcher of the ``redis`` backend
(connmix_tx/engine/queue_redis.py), which overrides the hooks ``_settle`` and ``_refill``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from connmix_tx.meter import NULL_METER, QueueMeter
from connmix_tx.names import valid_name

log = Logger(namespace="connmix.queue")

DISPATCH_BATCH = 256
#: While messages wait and every consumer is busy, look again after this many seconds.
RETRY_DELAY = 0.05


class QueueError(Exception):
    """A push or consume was refused; ``str(err)`` is the Lua-facing reason."""


class Consumer(Protocol):
    """What a queue needs from an API connection that consumes it."""

    def eligible(self) -> bool:
        """True while the consumer can take one more message (its buffer is small)."""

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        """Write one message (JSON text ``data`` pushed by ``client_id``) to the consumer.

        Auto-ack deliveries pass the first three arguments only; deliveries to a manual consumer
        add ``message_id`` and ``redelivered`` (0 on the first delivery) as keywords.
        """


#: Seconds an unacknowledged message may wait for its ack by default.
ACK_TIMEOUT = 30.0


class Message:
    """A message that carries an id: one taken back for redelivery, or read from a stream."""

    __slots__ = ("id", "client_id", "data", "redelivered")

    def __init__(self, message_id: str, client_id: str, data: bytes, redelivered: int = 0) -> None:
        self.id = message_id
        self.client_id = client_id
        self.data = data
        self.redelivered = redelivered

    def __repr__(self) -> str:
        return f"Message({self.id!r}, redelivered={self.redelivered})"


class Unacked:
    """One delivered, unacknowledged message: who holds it and until when."""

    __slots__ = ("message", "consumer", "deadline")

    def __init__(self, message: Message, consumer: "Consumer", deadline: float) -> None:
        self.message = message
        self.consumer = consumer
        self.deadline = deadline


class Topic:
    """The waiting messages of one topic, its consumers in round-robin order, its unacked ones.

    ``messages`` holds fresh ``(client_id, data)`` pairs (memory backend); ``ready`` holds
    ``Message`` objects served before them: redeliveries (at its head) and, on the redis backend,
    entries read from the stream.
    """

    __slots__ = ("name", "messages", "ready", "consumers", "manual", "unacked", "_next", "_seq")

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: deque[tuple[str, bytes]] = deque()
        self.ready: deque[Message] = deque()
        self.consumers: list[Consumer] = []
        #: The consumers that acknowledge by hand.
        self.manual: set[Consumer] = set()
        #: Delivered, unacknowledged messages by id, oldest delivery first.
        self.unacked: OrderedDict[str, Unacked] = OrderedDict()
        self._next = 0
        self._seq = 0

    @property
    def waiting(self) -> int:
        """Messages waiting for a consumer (not the unacknowledged ones)."""
        return len(self.messages) + len(self.ready)

    def next_id(self) -> str:
        """A message id unique in this topic (memory backend)."""
        self._seq += 1
        return str(self._seq)

    def next_consumer(self) -> Consumer | None:
        """The next eligible consumer in round-robin order, or None when none can take one."""
        count = len(self.consumers)
        for step in range(count):
            index = (self._next + step) % count
            consumer = self.consumers[index]
            if consumer.eligible():
                self._next = (index + 1) % count
                return consumer
        return None

    def remove(self, consumer: Consumer) -> None:
        index = self.consumers.index(consumer)
        del self.consumers[index]
        self.manual.discard(consumer)
        if index < self._next:
            self._next -= 1
        if self._next >= len(self.consumers):
            self._next = 0

    def take_back(self, messages: list[Message]) -> None:
        """Put ``messages`` (in delivery order) at the head of the line, counted as redelivered."""
        for message in reversed(messages):
            message.redelivered += 1
            self.ready.appendleft(message)


class QueueManager:
    """All topics of one engine (the ``memory`` backend)."""

    #: True when ``push`` answers with a Deferred (the Lua caller must be able to wait).
    waits = False
    backend = "memory"

    def __init__(
        self,
        clock: IReactorTime,
        topic_size: int = 2000,
        max_topics: int = 100,
        ack_timeout: float = ACK_TIMEOUT,
        meter: QueueMeter = NULL_METER,
    ) -> None:
        self.clock = clock
        self.topic_size = topic_size
        self.max_topics = max_topics
        self.ack_timeout = ack_timeout
        self.meter = meter
        self.topics: dict[str, Topic] = {}
        self._consuming: dict[Consumer, list[str]] = {}
        self._pending: set[str] = set()
        self._blocked: set[str] = set()
        self._call: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self.delivered = 0
        self.acks = 0
        self.redeliveries = 0

    def configure(self, topic_size: int, max_topics: int, ack_timeout: float | None = None) -> None:
        """Apply new capacities (hot reload): nothing waiting is dropped, no topic removed."""
        self.topic_size, self.max_topics = topic_size, max_topics
        if ack_timeout is not None:
            self.ack_timeout = ack_timeout

    @property
    def unacked(self) -> int:
        """Delivered, unacknowledged messages of every topic."""
        return sum(len(t.unacked) for t in self.topics.values())

    # Lua side ------------------------------------------------------------------------------

    def push(self, topic: str, client_id: str, data: bytes) -> int | Deferred[bool]:
        """Store one message; return how many wait in the topic now.  Raise QueueError.

        A backend that stores elsewhere (redis) answers later: a Deferred firing True once stored.
        """
        try:
            entry = self.topics.get(topic)
            if entry is None:
                if not valid_name(topic):
                    raise QueueError("invalid topic")
                entry = self._create(topic)
            if entry.waiting >= self.topic_size:
                raise QueueError("queue full")
        except QueueError as e:
            self.meter.pushed(topic if topic in self.topics else "", _result(e))
            raise
        entry.messages.append((client_id, data))
        self.meter.pushed(topic, "ok")
        if entry.consumers:
            self._schedule(topic)
        return entry.waiting

    # API side ------------------------------------------------------------------------------

    def consume(self, consumer: Consumer, topics: list[str], manual: bool = False) -> None:
        """Add ``consumer`` to every topic, all or nothing.  Raise QueueError."""
        if not topics or not all(valid_name(t) for t in topics):
            raise QueueError("invalid topic")
        mine = self._consuming.get(consumer, [])
        if any(t in mine for t in topics) or len(set(topics)) != len(topics):
            raise QueueError("duplicate consumption")
        self._check_room(topics)
        for name in topics:
            entry = self.topics.get(name) or self._create(name)
            entry.consumers.append(consumer)
            if manual:
                entry.manual.add(consumer)
            self._schedule(name)
        self._consuming.setdefault(consumer, []).extend(topics)

    def _check_room(self, topics: list[str]) -> None:
        new = [t for t in topics if t not in self.topics]
        if len(self.topics) + len(new) > self.max_topics:
            raise QueueError("too many topics")

    def unconsume(self, consumer: Consumer) -> list[str]:
        """Remove every consumption of ``consumer``; return the topics it consumed.

        Its unacknowledged messages go back to the head of their topics' lines.
        """
        topics = self._consuming.pop(consumer, [])
        for name in topics:
            entry = self.topics.get(name)
            if entry is None:
                continue
            entry.remove(consumer)
            held = [u.message for u in entry.unacked.values() if u.consumer is consumer]
            if held:
                for message in held:
                    del entry.unacked[message.id]
                self._take_back(entry, held)
            if entry.waiting and entry.consumers:
                self._schedule(name)
            self._maybe_remove(entry)
        return topics

    def ack(self, consumer: Consumer, topic: str, ids: list[str]) -> int:
        """Acknowledge the messages ``ids`` of ``topic`` held by ``consumer``; return how many.

        Unknown ids, ids already acknowledged or held by another consumer are not counted.
        Raise QueueError when ``consumer`` does not consume ``topic``.
        """
        if topic not in self._consuming.get(consumer, ()):
            raise QueueError("not consumed")
        done = self.settle(consumer, topic, ids)
        if done:
            self.acks += done
            self.meter.acked(topic, done)
        return done

    def settle(self, consumer: Consumer, topic: str, ids: list[str]) -> int:
        """The messages ``ids`` of ``topic`` held by ``consumer`` are done; return how many.

        ``ack`` without its checks and counts: also for a consumer that stands for another worker's
        (connmix_tx/engine/siblings.py), whose messages are done once written there.
        """
        entry = self.topics.get(topic)
        if entry is None:
            return 0
        done = self._held_by(entry, consumer, ids)
        if done:
            self._settle(entry, [message.id for message in done])
            if entry.waiting or self._refilling(entry):
                self._schedule(topic)  # the cap may have been what held them
            self._maybe_remove(entry)
        return len(done)

    def release(self, consumer: Consumer, topic: str, ids: list[str]) -> None:
        """The messages ``ids`` of ``topic`` held by ``consumer`` were not delivered after all:
        back to the head of their topic, counted as redelivered."""
        entry = self.topics.get(topic)
        if entry is None:
            return
        back = self._held_by(entry, consumer, ids)
        if back:
            self._take_back(entry, back)
            if entry.consumers:
                self._schedule(topic)

    @staticmethod
    def _held_by(entry: Topic, consumer: Consumer, ids: list[str]) -> list[Message]:
        """Take the messages ``ids`` that ``consumer`` holds out of ``entry``'s unacknowledged ones."""
        taken = []
        for message_id in ids:
            held = entry.unacked.get(message_id)
            if held is not None and held.consumer is consumer:
                del entry.unacked[message_id]
                taken.append(held.message)
        return taken

    def consumes(self, consumer: Consumer) -> list[str]:
        """The topics ``consumer`` consumes."""
        return list(self._consuming.get(consumer, ()))

    def length(self, topic: str) -> int:
        entry = self.topics.get(topic)
        return entry.waiting if entry else 0

    # Hooks of the redis backend ------------------------------------------------------------

    def _settle(self, entry: Topic, ids: list[str]) -> None:
        """Messages ``ids`` of ``entry`` are done (acknowledged, or written to an auto consumer)."""

    def _refilling(self, entry: Topic) -> bool:
        """True when ``entry`` could get more messages from elsewhere (redis backend)."""
        return False

    def _refill(self, entry: Topic, room: int) -> None:
        """``entry`` has consumers and room for ``room`` messages but nothing waiting."""

    # Dispatch ------------------------------------------------------------------------------

    def _create(self, name: str) -> Topic:
        if len(self.topics) >= self.max_topics:
            raise QueueError("too many topics")
        entry = self.topics[name] = Topic(name)
        return entry

    def _maybe_remove(self, entry: Topic) -> None:
        if not entry.waiting and not entry.consumers and not entry.unacked:
            del self.topics[entry.name]

    def _take_back(self, entry: Topic, messages: list[Message]) -> None:
        entry.take_back(messages)
        self.redeliveries += len(messages)
        self.meter.redelivered(entry.name, len(messages))

    def _schedule(self, topic: str) -> None:
        self._pending.add(topic)
        if self._call is None:
            self._call = self.clock.callLater(0, self._dispatch)

    def _retry_later(self, topic: str) -> None:
        self._blocked.add(topic)
        if self._retry is None:
            self._retry = self.clock.callLater(RETRY_DELAY, self._unblock)

    def _unblock(self) -> None:
        self._retry = None
        blocked, self._blocked = self._blocked, set()
        for name in blocked:
            self._schedule(name)

    def start(self) -> None:
        """The engine starts (nothing to do in memory; the redis backend connects)."""

    def stop(self) -> None:
        """Cancel scheduled dispatches (the engine stops)."""
        for call in (self._call, self._retry, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._call = self._retry = self._expiry = None

    def _dispatch(self) -> None:
        self._call = None
        pending, self._pending = self._pending, set()
        for name in pending:
            entry = self.topics.get(name)
            if entry is not None:
                self._dispatch_topic(entry)

    def _dispatch_topic(self, entry: Topic) -> None:
        name = entry.name
        sent = 0
        auto_done: list[str] = []
        manual = entry.manual
        while entry.consumers and sent < DISPATCH_BATCH:
            if not entry.ready and not entry.messages:
                room = min(self.topic_size - len(entry.unacked), DISPATCH_BATCH)
                if room > 0:
                    self._refill(entry, room)
                break
            if manual and len(entry.unacked) >= self.topic_size:
                break  # backpressure: acks will schedule this topic again
            consumer = entry.next_consumer()
            if consumer is None:
                self._retry_later(name)  # every consumer is busy: look again shortly
                break
            if entry.ready:
                message = entry.ready.popleft()
            elif consumer in manual:
                client_id, data = entry.messages.popleft()
                message = Message(entry.next_id(), client_id, data)
            else:
                client_id, data = entry.messages.popleft()  # the fast path: nothing to track
                consumer.deliver(name, client_id, data)
                sent += 1
                continue
            if consumer in manual:
                entry.unacked[message.id] = Unacked(message, consumer, self.clock.seconds() + self.ack_timeout)
                self._watch_expiry()
                consumer.deliver(name, message.client_id, message.data,
                                 message_id=message.id, redelivered=message.redelivered)
            else:
                consumer.deliver(name, message.client_id, message.data)
                auto_done.append(message.id)
            sent += 1
        self.delivered += sent
        if auto_done:
            self._settle(entry, auto_done)
        if entry.waiting and sent == DISPATCH_BATCH:
            self._schedule(name)  # the rest next turn, so one topic cannot starve the reactor
        self._maybe_remove(entry)

    # Ack timeout ---------------------------------------------------------------------------

    def _watch_expiry(self) -> None:
        if self._expiry is None:
            self._expiry = self.clock.callLater(self.ack_timeout, self._expire)

    def _expire(self) -> None:
        """Take back every message whose ack is overdue; look again at the next deadline."""
        self._expiry = None
        now = self.clock.seconds()
        soonest: float | None = None
        for entry in list(self.topics.values()):
            overdue = []
            for held in entry.unacked.values():
                if held.deadline > now:
                    soonest = held.deadline if soonest is None else min(soonest, held.deadline)
                    break  # oldest delivery first: the rest is later
                overdue.append(held.message)
            if overdue:
                log.debug("queue {topic}: {count} unacknowledged message(s) overdue",
                          topic=entry.name, count=len(overdue))
                for message in overdue:
                    del entry.unacked[message.id]
                self._take_back(entry, overdue)
                self._schedule(entry.name)
        if soonest is not None:
            self._expiry = self.clock.callLater(max(0.0, soonest - now), self._expire)


def _result(error: QueueError) -> str:
    """The ``result`` label of a refused push."""
    return "full" if str(error) == "queue full" else "error"
