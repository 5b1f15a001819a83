"""One engine to its users: an API connection consumes the queues of every worker (docs/workers.md).

With the ``memory`` backend each worker process holds its own topics.  ``SiblingQueues`` stands
where the API dispatcher expects the ``QueueManager`` and spans the workers of the engine:

* ``consume`` at worker W consumes W's own topics and sends a ``consume`` op (consumption key,
  topics, mode) over W's mesh link to every sibling S; the sibling registers a ``SiblingConsumer``
  (a proxy) in its own ``QueueManager``.  The proxy is a *manual* consumer there, so S holds every
  message it hands to W as unacknowledged until W says what became of it.
* The proxy sends each message as an ``event`` op over S's link to W; W writes the event to the
  API connection with S's node id (``node_id`` names the worker whose Lua pushed) and answers
  *written* (``busy`` when the connection's buffer is full: written, but send no more for a while)
  or *gone* (the consumption ended).  Written messages of an auto consumption are done on S;
  those of a manual consumption stay held by the proxy until the consumer's ``queue.ack`` reaches
  S as an ``ack`` op (their ids are prefixed ``w{worker}:`` so W knows where to send it).
* A proxy is eligible while fewer than ``IN_FLIGHT`` (256) of its events wait for their answer
  and its link to W is up.  An event answered *gone*, or lost with its link, goes back to the head
  of its topic on S: nothing that was not written is lost.
* ``unconsume`` (or the connection closing) sends ``unconsume`` ops; a sibling that joins later (a
  restarted worker) gets W's open consumptions; a sibling that leaves the node list takes its
  proxies (on its side) and its held ids (on ours) with it.

The ``redis`` backend needs none of this: its streams are shared by every worker.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from connmix_tx.engine.mesh import STATUS_BAD, STATUS_NOT_FOUND, STATUS_OK, STATUS_SLOW
from connmix_tx.engine.queue import RETRY_DELAY, QueueError, QueueManager
from connmix_tx.ids import node_number_of
from connmix_tx.names import valid_name

log = Logger(namespace="connmix.queue")

#: Events a proxy may have sent (or queued) whose answer has not come back.
IN_FLIGHT = 256
#: Answers of an ``event`` op (as the link reports them; ``None`` is written).
GONE, BUSY = "gone", "busy"
#: Seconds before a consumption a sibling could not take (link down, not listed yet) is sent again.
RESEND_DELAY = 1.0
UP = "up"


class _Consumption:
    """One ``queue.consume`` of an API connection on this worker."""

    __slots__ = ("key", "session", "topics", "manual")

    def __init__(self, key: int, session: Any, topics: list[str], manual: bool) -> None:
        self.key = key
        self.session = session
        self.topics = topics
        self.manual = manual


class SiblingConsumer:
    """A consumption of worker ``owner``, as a consumer of this worker's topics (the proxy)."""

    def __init__(self, siblings: "SiblingQueues", owner: str, key: int, manual: bool) -> None:
        self.siblings = siblings
        self.owner = owner
        self.key = key
        #: The consumer acknowledges by hand on the owner (else: written is done).
        self.manual = manual
        self.in_flight = 0
        self.paused_until = 0.0
        self.closed = False
        #: Events waiting for this turn's submission to the owner's link.
        self.outbox: list[tuple] = []

    def eligible(self) -> bool:
        if self.closed or self.in_flight >= IN_FLIGHT:
            return False
        if self.paused_until and self.siblings.clock.seconds() < self.paused_until:
            return False
        link = self.siblings.link_for(self.owner)
        return link is not None and link.state == UP

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        self.in_flight += 1
        self.outbox.append(("event", self.key, topic, client_id, self.siblings.node_id, data,
                            message_id, redelivered))
        self.siblings._outgoing(self)

    def __repr__(self) -> str:
        return f"SiblingConsumer({self.owner!r}, {self.key})"


class SiblingQueues:
    """The queues of every worker of the engine, for the API of this worker (memory backend).

    ``queues`` is this worker's ``QueueManager``; ``link_for(node_id)`` the mesh link to a sibling
    (or None).  ``update`` takes the siblings of each node list; the mesh point hands the sibling
    ops to ``apply``.  Everything the API does not need goes to ``queues`` unchanged.
    """

    def __init__(self, queues: QueueManager, node_id: str, clock: IReactorTime,
                 link_for: Callable[[str], Any]) -> None:
        self.queues = queues
        self.node_id = node_id
        self.clock = clock
        self.link_for = link_for
        #: Sibling node id -> worker index.
        self.siblings: dict[str, int] = {}
        # Consumptions held by this worker's API connections.
        self._keys = 0
        self._consumptions: dict[int, _Consumption] = {}
        self._by_session: dict[Any, list[int]] = {}
        #: Sibling -> keys sent to it (answered or not); a failed send takes its key out again.
        self._sent: dict[str, set[int]] = {}
        #: Session -> topic -> id as the consumer saw it -> (sibling, key, id on the sibling).
        self._held: dict[Any, dict[str, dict[str, tuple[str, int, str]]]] = {}
        # Proxies of the siblings' consumptions, by (owner, key).
        self.proxies: dict[tuple[str, int], SiblingConsumer] = {}
        self._outboxes: list[SiblingConsumer] = []
        self._flush_call: IDelayedCall | None = None
        self._resend_call: IDelayedCall | None = None
        self._node_json: dict[str, bytes] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "queues":
            raise AttributeError(name)
        return getattr(self.queues, name)  # push, length, configure, topics, ... as they are

    # The API side: the QueueManager interface ------------------------------------------------

    def consume(self, consumer: Any, topics: list[str], manual: bool = False) -> None:
        """Consume ``topics`` here (raises QueueError as ``QueueManager.consume``) and on every sibling."""
        self.queues.consume(consumer, topics, manual)
        self._keys += 1
        consumption = _Consumption(self._keys, consumer, list(topics), manual)
        self._consumptions[consumption.key] = consumption
        self._by_session.setdefault(consumer, []).append(consumption.key)
        for sibling in self.siblings:
            self._send_consume(sibling, consumption)

    def unconsume(self, consumer: Any) -> list[str]:
        topics = self.queues.unconsume(consumer)
        self._held.pop(consumer, None)
        for key in self._by_session.pop(consumer, []):
            del self._consumptions[key]
            for sibling, sent in self._sent.items():
                if key in sent:
                    sent.discard(key)
                    self._op(sibling, ("unconsume", self.node_id, key))
        return topics

    def ack(self, consumer: Any, topic: str, ids: list[str]) -> int:
        held = self._held.get(consumer, {}).get(topic) or {}
        remote = [i for i in ids if i in held]
        local = [i for i in ids if i not in held] if remote else ids
        count = self.queues.ack(consumer, topic, local)  # raises QueueError when not consumed
        by_sibling: dict[tuple[str, int], list[str]] = defaultdict(list)
        for message_id in remote:
            sibling, key, raw = held.pop(message_id)
            by_sibling[sibling, key].append(raw)
        for (sibling, key), raw_ids in by_sibling.items():
            self._op(sibling, ("ack", self.node_id, key, topic, raw_ids))
        return count + len(remote)

    def consumes(self, consumer: Any) -> list[str]:
        return self.queues.consumes(consumer)

    def stop(self) -> None:
        for call in (self._flush_call, self._resend_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._resend_call = None
        self.queues.stop()

    # The node list -----------------------------------------------------------------------------

    def update(self, nodes: Iterable[dict[str, Any]]) -> None:
        """The siblings of the latest node list (``EnginePart.siblings()``)."""
        wanted = {str(n["id"]): int(n.get("worker", 0)) for n in nodes}
        for sibling in [s for s in self.siblings if s not in wanted]:
            self._forget(sibling)
        for sibling, index in wanted.items():
            if sibling not in self.siblings:
                self.siblings[sibling] = index
                log.debug("queue consumptions reach worker {index} ({node_id})", index=index, node_id=sibling)
                for consumption in list(self._consumptions.values()):
                    self._send_consume(sibling, consumption)

    def _forget(self, sibling: str) -> None:
        """``sibling`` left the node list: its proxies here go, our held ids of it too."""
        del self.siblings[sibling]
        self._sent.pop(sibling, None)
        self._node_json.pop(sibling, None)
        for topics in self._held.values():
            for held in topics.values():
                for message_id in [i for i, (s, _, _) in held.items() if s == sibling]:
                    del held[message_id]
        for owner, key in [k for k in self.proxies if k[0] == sibling]:
            self._drop_proxy(owner, key)

    # Sending -----------------------------------------------------------------------------------

    def _send_consume(self, sibling: str, consumption: _Consumption) -> None:
        sent = self._sent.setdefault(sibling, set())
        if consumption.key in sent:
            return
        sent.add(consumption.key)
        op = ("consume", self.node_id, consumption.key, consumption.topics, consumption.manual)
        self._op(sibling, op, lambda error: self._consume_answered(sibling, consumption.key, error))

    def _consume_answered(self, sibling: str, key: int, error: str | None) -> None:
        if error is None or key not in self._consumptions or sibling not in self.siblings:
            return
        if error.startswith("retry") or error in ("node unavailable", "mesh timeout"):
            self._sent.get(sibling, set()).discard(key)
            self._resend_later()
        else:
            log.warn("queue consumption of worker {index} refused: {error}",
                     index=self.siblings[sibling], error=error)

    def _resend_later(self) -> None:
        if self._resend_call is None:
            self._resend_call = self.clock.callLater(RESEND_DELAY, self._resend)

    def _resend(self) -> None:
        self._resend_call = None
        for sibling in list(self.siblings):
            for consumption in list(self._consumptions.values()):
                self._send_consume(sibling, consumption)

    def _op(self, sibling: str, op: tuple, done: Callable[[str | None], Any] | None = None) -> None:
        link = self.link_for(sibling)
        if link is None:
            if done is not None:
                done("node unavailable")
            return
        link.submit([op], (lambda results: done(results[0])) if done is not None else _ignore)

    # The sibling side: ops from the mesh point ------------------------------------------------

    def apply(self, name: str, args: list) -> tuple[int, Any]:
        """Run one sibling op arriving over the mesh; return (status, a) of its reply."""
        if name == "event":
            return self._event(*args)
        owner = args[0]
        if not isinstance(owner, str) or owner not in self.siblings:
            return STATUS_BAD, "retry: not a sibling (yet)"
        if name == "consume":
            return self._consume_for(owner, *args[1:])
        if name == "unconsume":
            self._drop_proxy(owner, args[1])
            return STATUS_OK, None
        if name == "ack":
            return self._ack_for(owner, *args[1:])
        return STATUS_BAD, f"unknown op {name!r}"

    def _consume_for(self, owner: str, key: int, topics: list, manual: bool) -> tuple[int, Any]:
        if (owner, key) in self.proxies:
            return STATUS_OK, None
        if not isinstance(topics, list) or not topics or not all(valid_name(t) for t in topics):
            return STATUS_BAD, "invalid topic"
        proxy = SiblingConsumer(self, owner, key, bool(manual))
        try:
            self.queues.consume(proxy, topics, manual=True)
        except QueueError as e:
            return STATUS_BAD, str(e)
        self.proxies[owner, key] = proxy
        return STATUS_OK, None

    def _ack_for(self, owner: str, key: int, topic: str, ids: list) -> tuple[int, Any]:
        proxy = self.proxies.get((owner, key))
        if proxy is None or not isinstance(ids, list):
            return STATUS_OK, 0
        try:
            return STATUS_OK, self.queues.ack(proxy, topic, [str(i) for i in ids])
        except QueueError:
            return STATUS_OK, 0

    def _drop_proxy(self, owner: str, key: int) -> None:
        proxy = self.proxies.pop((owner, key), None)
        if proxy is not None:
            proxy.closed = True
            self.queues.unconsume(proxy)  # what it held goes back to the head of its topics

    # The owner side: events from siblings ----------------------------------------------------

    def _event(self, key: int, topic: str, client_id: str, node_id: str, data: bytes,
               message_id: str | None, redelivered: int) -> tuple[int, Any]:
        consumption = self._consumptions.get(key)
        if consumption is None or topic not in consumption.topics:
            return STATUS_NOT_FOUND, GONE
        session = consumption.session
        node_json = self._node_json.get(node_id)
        if node_json is None:
            node_json = self._node_json[node_id] = json.dumps(str(node_id)).encode()
        if consumption.manual and message_id is not None:
            index = self.siblings.get(node_id)
            shown = f"w{index}:{message_id}" if index is not None else f"{node_id}:{message_id}"
            held = self._held.setdefault(session, {}).setdefault(topic, {})
            held[shown] = (node_id, key, str(message_id))
            if len(held) > (len(self.siblings) + 1) * self.queues.topic_size:
                # Ids a sibling meanwhile redelivered to another consumer are never acked here:
                # the oldest go (a late ack of one is not counted; the sibling redelivers it).
                del held[next(iter(held))]
            session.deliver_from(node_json, topic, client_id, data, shown, int(redelivered or 0))
        else:
            session.deliver_from(node_json, topic, client_id, data)
        return (STATUS_OK, None) if session.eligible() else (STATUS_SLOW, BUSY)

    # The sibling side: sending events and reading their answers -------------------------------

    def _outgoing(self, proxy: SiblingConsumer) -> None:
        if len(proxy.outbox) == 1:
            self._outboxes.append(proxy)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        outboxes, self._outboxes = self._outboxes, []
        for proxy in outboxes:
            events, proxy.outbox = proxy.outbox, []
            link = None if proxy.closed else self.link_for(proxy.owner)
            if link is None:
                self._answered(proxy, events, ["node unavailable"] * len(events))
            else:
                link.submit(events, lambda results, p=proxy, e=events: self._answered(p, e, results))

    def _answered(self, proxy: SiblingConsumer, events: list[tuple], results: list) -> None:
        """The owner answered (or the link failed) the ``events`` the proxy sent."""
        proxy.in_flight -= len(events)
        if proxy.closed:
            return  # unconsumed: what it held went back to the head of its topics already
        done: dict[str, list[str]] = defaultdict(list)
        back: dict[str, list[str]] = defaultdict(list)
        gone = False
        for event, result in zip(events, results):
            topic, message_id = event[2], event[6]
            if result is None or result == BUSY:
                if result == BUSY:
                    proxy.paused_until = self.clock.seconds() + RETRY_DELAY
                if not proxy.manual:
                    done[topic].append(message_id)
            elif result == GONE:
                gone = True
                break
            else:
                back[topic].append(message_id)
        for topic, ids in done.items():
            self.queues.settle(proxy, topic, ids)
        if gone:
            self._drop_proxy(proxy.owner, proxy.key)
            return
        if back:
            # Not written (link lost, timeout, refused): back to the head; and a pause, so an
            # owner that keeps refusing cannot turn this into a loop at full speed.
            proxy.paused_until = self.clock.seconds() + RETRY_DELAY
            for topic, ids in back.items():
                self.queues.release(proxy, topic, ids)


def _ignore(results: list) -> None:
    pass


class _Named:
    """An API connection as a consumer whose events name the pushing worker (redis backend)."""

    __slots__ = ("names", "session")

    def __init__(self, names: "PusherNodeIds", session: Any) -> None:
        self.names = names
        self.session = session

    def eligible(self) -> bool:
        return self.session.eligible()

    def deliver(self, topic: str, client_id: str, data: bytes, message_id: str | None = None,
                redelivered: int = 0) -> None:
        self.session.deliver_from(self.names.node_json(client_id), topic, client_id, data, message_id,
                                  redelivered)


class PusherNodeIds:
    """The ``redis`` backend of a multi-worker engine: its streams are shared by every worker, so
    nothing needs forwarding; events name the worker whose Lua pushed, found from the node number
    in the pushing client's id (the consuming worker's own id for a push outside any connection,
    or from a node no longer listed).  Everything else goes to ``queues`` unchanged.
    """

    def __init__(self, queues: QueueManager, node_id: str) -> None:
        self.queues = queues
        self._own = json.dumps(node_id).encode()
        self._names: dict[int, bytes] = {}
        self._consumers: dict[Any, _Named] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "queues":
            raise AttributeError(name)
        return getattr(self.queues, name)

    def update(self, nodes: Iterable[dict[str, Any]]) -> None:
        """The latest node list (every node: engines on the same Redis push into the same streams)."""
        self._names = {int(n["number"]): json.dumps(str(n["id"])).encode() for n in nodes if "number" in n}

    def node_json(self, client_id: str) -> bytes:
        try:
            return self._names.get(node_number_of(int(client_id)), self._own)
        except ValueError:
            return self._own

    def consume(self, consumer: Any, topics: list[str], manual: bool = False) -> None:
        named = self._consumers.get(consumer) or _Named(self, consumer)
        self.queues.consume(named, topics, manual)
        self._consumers[consumer] = named

    def unconsume(self, consumer: Any) -> list[str]:
        named = self._consumers.pop(consumer, None)
        return self.queues.unconsume(named) if named is not None else []

    def ack(self, consumer: Any, topic: str, ids: list[str]) -> int:
        named = self._consumers.get(consumer)
        if named is None:
            raise QueueError("not consumed")
        return self.queues.ack(named, topic, ids)

    def consumes(self, consumer: Any) -> list[str]:
        named = self._consumers.get(consumer)
        return self.queues.consumes(named) if named is not None else []
