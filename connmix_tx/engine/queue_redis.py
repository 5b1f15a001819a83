"""The ``redis`` queue backend: each topic a Redis Stream shared by the cluster (docs/queues.md).

A topic ``foo`` is the stream ``{prefix}foo`` with one consumer group (``GROUP``); every engine
on the same Redis reads it as the group consumer named by its node id, so a message pushed on any
engine goes to one consumer connected to any engine.  What the stream holds is what is not yet
acknowledged: an entry is ``XACK``-ed and ``XDEL``-eted together once done (an auto-ack event was
written, or a manual consumer acknowledged it), so ``XLEN`` is the waiting + unacknowledged count
that ``topicSize`` caps (``queue full``), and nothing is ever trimmed.

* ``push`` returns a Deferred: the message is added by a small Lua script (``XLEN`` check, then
  ``XADD``) in the pipeline of this reactor turn; it fires ``True`` once Redis stored it, or fails
  with ``QueueError("queue full")`` / ``QueueError("queue unavailable")`` (Redis down or silent
  for 2 s).
* Reading: a topic with an eligible local consumer and nothing waiting locally asks for at most
  as many entries as it may deliver (``XREADGROUP ... COUNT n``).  An empty answer puts the topic
  on a poll list read again every ``POLL_INTERVAL``; a push through this engine reads at once.
  Polling instead of ``XREADGROUP BLOCK``: BLOCK would hold the one pipelined connection (pushes
  and acks would wait behind it) or need a connection per topic set, unblocked with ``CLIENT
  UNBLOCK`` whenever the set changes; a 50 ms poll of a consumed topic costs Redis 20 small
  commands a second, and while messages flow reads follow each other without any wait.
* Local dispatch, manual acks, the ack timeout and the unacked cap are the ``QueueManager``'s.
  The messages of a manual consumer that leaves go to the head of the local line (for the next
  consumer of this engine); they also stay pending in Redis under this engine's name, so another
  engine claims them after ``ackTimeout`` when nobody here takes them (at least once: both may).
* Claiming: every ``claim_interval`` seconds, for each topic consumed here, entries pending for
  longer than ``ackTimeout`` in another consumer (a dead engine, or one whose consumer is gone)
  are ``XCLAIM``-ed and redelivered at the head of the line with their delivery count.
* ``maxTopics`` does not apply: Redis holds the topics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.config import RedisConfig
from connmix_tx.engine.queue import (
    ACK_TIMEOUT, DISPATCH_BATCH, Consumer, Message, QueueError, QueueManager, Topic,
)
from connmix_tx.engine.redis_link import RedisLink
from connmix_tx.lua.redis import RedisError, ReplyError
from connmix_tx.meter import NULL_METER, QueueMeter
from connmix_tx.names import valid_name
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.queue")

GROUP = b"connmix"
#: Seconds between reads of a consumed topic that had nothing.
POLL_INTERVAL = 0.05
#: Most pending entries looked at per topic per claim round.
CLAIM_BATCH = 100

#: KEYS[1] stream; ARGV topicSize, client id, data.  Nil when the stream is full.
PUSH_SCRIPT = b"""
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'c', ARGV[2], 'd', ARGV[3])
"""


class RedisQueueManager(QueueManager):
    """The topics of this engine backed by Redis Streams."""

    waits = True
    backend = "redis"

    def __init__(
        self,
        clock: IReactor,
        redis: RedisConfig,
        consumer_name: str,
        topic_size: int = 2000,
        prefix: str = "connmix:queue:",
        ack_timeout: float = ACK_TIMEOUT,
        meter: QueueMeter = NULL_METER,
        endpoint: IStreamClientEndpoint | None = None,
        claim_interval: float | None = None,
    ) -> None:
        super().__init__(clock, topic_size, max_topics=0, ack_timeout=ack_timeout, meter=meter)
        self.prefix = prefix.encode()
        self.me = consumer_name.encode()
        self.claim_interval = claim_interval
        self.link = RedisLink(redis, clock, prepare=self._prepare, on_up=self._link_up, endpoint=endpoint)
        self._sha = b""
        self._fetching: set[str] = set()
        self._idle: set[str] = set()
        self._poll: IDelayedCall | None = None
        self._groups: set[str] = set()
        self._claimer = LoopingCall(self._claim_round)
        self._claimer.clock = clock

    @property
    def up(self) -> bool:
        """True while Redis answers (the ``connmix_engine_queue_backend_up`` gauge)."""
        return self.link.up

    def start(self) -> None:
        self.link.start()
        self._claimer.start(self._claim_every(), now=False)

    def stop(self) -> None:
        super().stop()
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = None
        if self._claimer.running:
            self._claimer.stop()
        self.link.stop()

    def configure(self, topic_size: int, max_topics: int, ack_timeout: float | None = None) -> None:
        super().configure(topic_size, max_topics, ack_timeout)
        if self._claimer.running and self._claimer.interval != self._claim_every():
            self._claimer.stop()
            self._claimer.start(self._claim_every(), now=False)

    def _claim_every(self) -> float:
        if self.claim_interval is not None:
            return self.claim_interval
        return max(0.1, min(self.ack_timeout / 2, 5.0))

    def _key(self, topic: str) -> bytes:
        return self.prefix + topic.encode()

    # link ----------------------------------------------------------------------------------

    def _prepare(self) -> list[list[bytes]]:
        """Run first on every connection: load the push script (its sha never changes)."""
        self._sha = hashlib.sha1(PUSH_SCRIPT).hexdigest().encode()
        return [[b"SCRIPT", b"LOAD", PUSH_SCRIPT]]

    def _link_up(self) -> None:
        """(Re)connected: groups may be gone (a Redis restart), read every consumed topic again."""
        self._groups.clear()
        self._fetching.clear()
        for name, entry in self.topics.items():
            if entry.consumers:
                self._ensure_group(name)
                self._schedule(name)

    # Lua side ------------------------------------------------------------------------------

    def push(self, topic: str, client_id: str, data: bytes) -> Deferred[bool]:
        """Store one message in the topic's stream; fires True, fails with QueueError."""
        d: Deferred = Deferred()
        if not valid_name(topic):
            self.meter.pushed("", "error")
            d.errback(QueueError("invalid topic"))
            return d
        sent = self.link.command([b"EVALSHA", self._sha, b"1", self._key(topic),
                                  b"%d" % self.topic_size, client_id.encode(), data])
        sent.addCallbacks(self._pushed, self._push_failed, callbackArgs=(topic, d), errbackArgs=(topic, d))
        entry = self.topics.get(topic)
        if entry is not None and entry.consumers and not entry.waiting:
            # A consumer here waits: read in the same pipeline, right behind the XADD (saves a
            # round trip; Redis runs the pipeline in order, so the read sees the new entry).
            room = min(self.topic_size - len(entry.unacked), DISPATCH_BATCH)
            if room > 0:
                self._refill(entry, room)
        return d

    def _pushed(self, reply: Any, topic: str, d: Deferred) -> None:
        if isinstance(reply, bytes):
            self.meter.pushed(topic, "ok")
            entry = self.topics.get(topic)
            if entry is not None and entry.consumers and topic in self._idle:
                self._idle.discard(topic)
                self._schedule(topic)  # read it now rather than at the next poll
            d.callback(True)
        elif reply is None:
            self.meter.pushed(topic, "full")
            d.errback(QueueError("queue full"))
        else:
            log.warn("queue push to {topic}: redis error {error}", topic=topic, error=reply)
            self.meter.pushed(topic, "error")
            d.errback(QueueError("queue unavailable"))

    def _push_failed(self, failure: Failure, topic: str, d: Deferred) -> None:
        failure.trap(RedisError)
        self.meter.pushed(topic, "error")
        d.errback(QueueError("queue unavailable"))

    # API side ------------------------------------------------------------------------------

    def _check_room(self, topics: list[str]) -> None:
        pass  # maxTopics does not apply: Redis holds the topics

    def _create(self, name: str) -> Topic:
        entry = self.topics[name] = Topic(name)
        return entry

    def consume(self, consumer: Consumer, topics: list[str], manual: bool = False) -> None:
        super().consume(consumer, topics, manual)
        for name in topics:
            self._ensure_group(name)

    def _ensure_group(self, name: str) -> None:
        if name in self._groups or not self.link.up:
            return
        self._groups.add(name)
        self.link.command([b"XGROUP", b"CREATE", self._key(name), GROUP, b"0", b"MKSTREAM"]).addErrback(
            _ignore)  # a BUSYGROUP reply (the group exists) is a value, not a failure

    # hooks ---------------------------------------------------------------------------------

    def _settle(self, entry: Topic, ids: list[str]) -> None:
        """Done messages leave the stream: XACK and XDEL, in this turn's pipeline."""
        if not self.link.up:
            return  # they stay pending and are claimed later: at least once
        key = self._key(entry.name)
        raw = [i.encode() for i in ids]
        self.link.command([b"XACK", key, GROUP, *raw]).addErrback(_ignore)
        self.link.command([b"XDEL", key, *raw]).addErrback(_ignore)

    def _refilling(self, entry: Topic) -> bool:
        return bool(entry.consumers)

    def _refill(self, entry: Topic, room: int) -> None:
        name = entry.name
        if name in self._fetching or not self.link.up:
            return
        if not any(c.eligible() for c in entry.consumers):
            self._retry_later(name)
            return
        self._fetching.add(name)
        reading = self.link.command([b"XREADGROUP", b"GROUP", GROUP, self.me, b"COUNT", b"%d" % room,
                                     b"STREAMS", self._key(name), b">"])
        reading.addCallbacks(self._read, self._read_failed, callbackArgs=(name,), errbackArgs=(name,))

    def _read(self, reply: Any, name: str) -> None:
        self._fetching.discard(name)
        entry = self.topics.get(name)
        if isinstance(reply, ReplyError):
            if str(reply).startswith("NOGROUP"):
                self._groups.discard(name)  # the stream or group went away (Redis restarted?)
                if entry is not None and entry.consumers:
                    self._ensure_group(name)
                    self._schedule(name)
            else:
                log.warn("queue {topic}: redis error {error}", topic=name, error=reply)
                self._idle_poll(name)
            return
        if entry is None or not entry.consumers:
            return  # read for a consumer that left: pending here, claimed later
        messages = _entries(reply[0][1]) if reply else []
        if not messages:
            self._idle_poll(name)
            return
        entry.ready.extend(messages)
        self._schedule(name)

    def _read_failed(self, failure: Failure, name: str) -> None:
        failure.trap(RedisError)
        self._fetching.discard(name)  # the link is down; _link_up reads again

    def _idle_poll(self, name: str) -> None:
        self._idle.add(name)
        if self._poll is None:
            self._poll = self.clock.callLater(POLL_INTERVAL, self._poll_again)

    def _poll_again(self) -> None:
        self._poll = None
        idle, self._idle = self._idle, set()
        for name in idle:
            entry = self.topics.get(name)
            if entry is not None and entry.consumers:
                self._schedule(name)

    # claiming ------------------------------------------------------------------------------

    def _claim_round(self) -> None:
        if not self.link.up:
            return
        for name, entry in list(self.topics.items()):
            if entry.consumers:
                looking = self.link.command([b"XPENDING", self._key(name), GROUP, b"IDLE",
                                             b"%d" % int(self.ack_timeout * 1000), b"-", b"+",
                                             b"%d" % CLAIM_BATCH])
                looking.addCallbacks(self._pending_seen, _ignore, callbackArgs=(name,))

    def _pending_seen(self, reply: Any, name: str) -> None:
        entry = self.topics.get(name)
        if not isinstance(reply, list) or not reply or entry is None or not entry.consumers:
            return
        mine = set(entry.unacked) | {m.id for m in entry.ready}
        counts = {}
        for message_id, _consumer, _idle, deliveries in reply:
            text = message_id.decode()
            if text not in mine:
                counts[message_id] = deliveries
        if not counts:
            return
        claiming = self.link.command([b"XCLAIM", self._key(name), GROUP, self.me,
                                      b"%d" % int(self.ack_timeout * 1000), *counts])
        claiming.addCallbacks(self._claimed, _ignore, callbackArgs=(name, counts))

    def _claimed(self, reply: Any, name: str, counts: dict[bytes, int]) -> None:
        entry = self.topics.get(name)
        if not isinstance(reply, list) or entry is None:
            return
        messages = _entries(reply)
        if not messages:
            return
        for message in messages:
            message.redelivered = max(0, counts.get(message.id.encode(), 1) - 1)
        log.info("queue {topic}: claimed {count} unacknowledged message(s) of other consumers",
                 topic=name, count=len(messages))
        self._take_back(entry, messages)  # counts each as one more delivery
        self._schedule(name)


def _entries(items: Sequence[Any]) -> list[Message]:
    """Stream entries ``[id, [field, value, ...]]`` as messages (deleted entries skipped)."""
    out = []
    for item in items:
        if not item or item[1] is None:
            continue
        message_id, fields = item
        values = dict(zip(fields[::2], fields[1::2]))
        data = values.get(b"d")
        if data is None:
            continue
        out.append(Message(message_id.decode(), values.get(b"c", b"").decode(), data))
    return out


def _ignore(failure: Failure) -> None:
    failure.trap(RedisError)
