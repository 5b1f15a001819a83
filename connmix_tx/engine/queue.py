"""In-memory topics with competing consumers (SPEC 6).

Lua pushes serialised messages into a topic of this engine; API connections consume topics.  Each
message goes to exactly one consumer, round robin over the consumers that are *eligible* (their
outbound buffer is small enough).  Messages wait while nobody can take them, up to the topic's
capacity; a push to a full topic is refused, never dropped silently.  Delivery happens at the end
of the reactor turn, never inside the pushing Lua call.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="connmix.queue")

DISPATCH_BATCH = 256
#: While messages wait and every consumer is busy, look again after this many seconds.
RETRY_DELAY = 0.05
MAX_NAME_BYTES = 255


class QueueError(Exception):
    """A push or consume was refused; ``str(err)`` is the Lua-facing reason."""


class Consumer(Protocol):
    """What a queue needs from an API connection that consumes it."""

    def eligible(self) -> bool:
        """True while the consumer can take one more message (its buffer is small)."""

    def deliver(self, topic: str, client_id: str, data: bytes) -> None:
        """Write one message (JSON text ``data`` pushed by ``client_id``) to the consumer."""


def valid_name(name: object) -> bool:
    """Topic and channel names: 1-255 bytes of text, no whitespace or control characters."""
    if not isinstance(name, str) or not name:
        return False
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return False
    return not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name)


class Topic:
    """The waiting messages of one topic and its consumers in round-robin order."""

    __slots__ = ("name", "messages", "consumers", "_next")

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: deque[tuple[str, bytes]] = deque()
        self.consumers: list[Consumer] = []
        self._next = 0

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
        if index < self._next:
            self._next -= 1
        if self._next >= len(self.consumers):
            self._next = 0


class QueueManager:
    """All topics of one engine."""

    def __init__(self, clock: IReactorTime, topic_size: int = 2000, max_topics: int = 100) -> None:
        self.clock = clock
        self.topic_size = topic_size
        self.max_topics = max_topics
        self.topics: dict[str, Topic] = {}
        self._consuming: dict[Consumer, list[str]] = {}
        self._pending: set[str] = set()
        self._blocked: set[str] = set()
        self._call: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self.delivered = 0

    def configure(self, topic_size: int, max_topics: int) -> None:
        """Apply new capacities (hot reload): nothing waiting is dropped, no topic removed."""
        self.topic_size, self.max_topics = topic_size, max_topics

    # Lua side ------------------------------------------------------------------------------

    def push(self, topic: str, client_id: str, data: bytes) -> int:
        """Store one message; return how many wait in the topic now.  Raise QueueError."""
        entry = self.topics.get(topic)
        if entry is None:
            if not valid_name(topic):
                raise QueueError("invalid topic")
            entry = self._create(topic)
        if len(entry.messages) >= self.topic_size:
            raise QueueError("queue full")
        entry.messages.append((client_id, data))
        if entry.consumers:
            self._schedule(topic)
        return len(entry.messages)

    # API side ------------------------------------------------------------------------------

    def consume(self, consumer: Consumer, topics: list[str]) -> None:
        """Add ``consumer`` to every topic, all or nothing.  Raise QueueError."""
        if not topics or not all(valid_name(t) for t in topics):
            raise QueueError("invalid topic")
        mine = self._consuming.get(consumer, [])
        if any(t in mine for t in topics) or len(set(topics)) != len(topics):
            raise QueueError("duplicate consumption")
        new = [t for t in topics if t not in self.topics]
        if len(self.topics) + len(new) > self.max_topics:
            raise QueueError("too many topics")
        for name in topics:
            entry = self.topics.get(name) or self._create(name)
            entry.consumers.append(consumer)
            if entry.messages:
                self._schedule(name)
        self._consuming.setdefault(consumer, []).extend(topics)

    def unconsume(self, consumer: Consumer) -> list[str]:
        """Remove every consumption of ``consumer``; return the topics it consumed."""
        topics = self._consuming.pop(consumer, [])
        for name in topics:
            entry = self.topics.get(name)
            if entry is None:
                continue
            entry.remove(consumer)
            if entry.messages and entry.consumers:
                self._schedule(name)
            self._maybe_remove(entry)
        return topics

    def consumes(self, consumer: Consumer) -> list[str]:
        """The topics ``consumer`` consumes."""
        return list(self._consuming.get(consumer, ()))

    def length(self, topic: str) -> int:
        entry = self.topics.get(topic)
        return len(entry.messages) if entry else 0

    # Dispatch ------------------------------------------------------------------------------

    def _create(self, name: str) -> Topic:
        if len(self.topics) >= self.max_topics:
            raise QueueError("too many topics")
        entry = self.topics[name] = Topic(name)
        return entry

    def _maybe_remove(self, entry: Topic) -> None:
        if not entry.messages and not entry.consumers:
            del self.topics[entry.name]

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

    def stop(self) -> None:
        """Cancel scheduled dispatches (the engine stops)."""
        for call in (self._call, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._call = self._retry = None

    def _dispatch(self) -> None:
        self._call = None
        pending, self._pending = self._pending, set()
        for name in pending:
            entry = self.topics.get(name)
            if entry is None:
                continue
            sent = 0
            while entry.messages and entry.consumers and sent < DISPATCH_BATCH:
                consumer = entry.next_consumer()
                if consumer is None:
                    self._retry_later(name)  # every consumer is busy: look again shortly
                    break
                client_id, data = entry.messages.popleft()
                consumer.deliver(name, client_id, data)
                sent += 1
            self.delivered += sent
            if entry.messages and sent == DISPATCH_BATCH:
                self._schedule(name)  # the rest next turn, so one topic cannot starve the reactor
            self._maybe_remove(entry)
