"""Outgoing mesh links to the other engines (docs/operations.md, "The mesh" and "Routing").

``MeshLink`` is one engine's link to one peer's mesh point.  Operations (send, publish, call) are
queued and flushed once per reactor turn as one opaque msgpack blob per ``callRemote("batch")``
(at most ``MAX_BLOB`` bytes, at most ``MAX_IN_FLIGHT`` batches waiting for their reply), so order
per (sender, destination) is kept and PB never sees a string near its 640 KiB limit.  Every
operation ends: with the peer's answer, with ``mesh timeout`` after ``cluster.meshTimeout``, or
with ``node unavailable`` when the link is lost.

Two ways in: ``send`` / ``publish`` / ``call`` return one Deferred per operation (Lua, publish),
and ``submit`` takes the operations of a whole API read at once and calls one function with all
their results when the last one ended (no Deferred per operation: the fast path of
docs/performance.md).  Both share the queue, so they keep each other's order.  The Deferreds a
link returns never errback.

``MeshPeers`` keeps one link per live engine of the center's node list and is what the
``Router`` asks for a node number.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import msgpack
from twisted.application.internet import ClientService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.engine.mesh import SIBLING_OPS, STATUS_ENCODE, STATUS_NOT_FOUND, STATUS_OK, STATUS_SLOW
from connmix_tx.engine.connections import CLIENT_NOT_FOUND, ENCODE_FAILED, SLOW_CONSUMER
from connmix_tx.engine.outbox import send_now
from connmix_tx.engine.router import NODE_UNAVAILABLE
from connmix_tx.meter import NULL_METER, MeshMeter
from connmix_tx.pb import BrokerFactory, login, reason_text, retry_delay
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.mesh")

MAX_BLOB = 256 * 1024
MAX_OP = 600 * 1024
MAX_IN_FLIGHT = 8
ARRAY_HEADER = 5  # the largest msgpack array header, put in front of a blob's ops
MESH_TIMEOUT = "mesh timeout"
MESSAGE_TOO_LARGE = "message too large"
SWEEP_EVERY = 0.25

_SEND_ERRORS = {STATUS_NOT_FOUND: CLIENT_NOT_FOUND, STATUS_SLOW: SLOW_CONSUMER, STATUS_ENCODE: ENCODE_FAILED}

CONNECTING, UP, DOWN = "connecting", "up", "down"


class _Group:
    """Operations submitted together: one completion when the last of them has a result."""

    __slots__ = ("results", "left", "done")

    def __init__(self, size: int, done: Callable[[list], Any]) -> None:
        self.results: list = [None] * size
        self.left = size
        self.done = done

    def settle(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self.done(self.results)


class _Op:
    """One operation waiting for its answer; ``end(result)`` reports it."""

    __slots__ = ("kind", "end", "created", "packed")

    def __init__(self, kind: str, end: Callable[[Any], Any], created: float, packed: bytes) -> None:
        self.kind = kind
        self.end = end
        self.created = created
        self.packed = packed


def _end(end: Callable[[Any], Any], result: Any) -> None:
    """Report an operation's result; a failing completion must not keep the others from ending."""
    try:
        end(result)
    except Exception:
        log.failure("mesh completion failed")


@dataclass
class _Batch:
    seqs: list[int] = field(default_factory=list)
    sent: float = 0.0


def _unavailable(kind: str, reason: str) -> Any:
    """The result of an operation that got no answer."""
    return (0, 0) if kind == "publish" else reason


class MeshLink:
    """The link from this engine to one peer engine."""

    def __init__(
        self,
        reactor: IReactor,
        node: dict[str, Any],
        own_node_id: str,
        secret: str,
        mesh_timeout: float = 5.0,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 15.0,
        endpoint: Any = None,
        meter: MeshMeter = NULL_METER,
    ) -> None:
        self.reactor = reactor
        self.meter = meter
        self._batches_out = meter.batch("out")
        #: Forwarded sends, timed from queueing to the peer's answer (local ones in ``LocalOps.send``).
        self._forward_send = meter.forward_send
        self._out = {kind: meter.op("out", kind) for kind in ("send", "publish", "call")}
        self.node_id = str(node["id"])
        self.number = int(node["number"])
        self.mesh_point = str(node["mesh_point"])
        self.own_node_id = own_node_id
        self.secret = secret
        self.mesh_timeout = mesh_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.state = CONNECTING
        self._endpoint = endpoint or endpoints.clientFromString(reactor, _client_string(self.mesh_point))
        self._seq = itertools.count(1)
        self._ops: dict[int, _Op] = {}
        self._queue: deque[int] = deque()
        self._in_flight = 0
        self._avatar: Any = None
        self._flush_call: IDelayedCall | None = None
        self._last_sent = 0.0
        self._last_reply = 0.0
        self._client: ClientService | None = None
        self._refusals = 0
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    # Life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._client = ClientService(
            self._endpoint, BrokerFactory(self._connected),
            retryPolicy=lambda failed: retry_delay(failed + self._refusals), clock=self.reactor,
        )
        self._client.startService()
        self._sweeper.start(SWEEP_EVERY, now=False)

    def stop(self) -> Deferred | None:
        """Close the link (the peer left the node list); pending operations fail at once."""
        self.state = DOWN
        if self._sweeper.running:
            self._sweeper.stop()
        self._fail_all(NODE_UNAVAILABLE)
        if self._client is not None:
            client, self._client = self._client, None
            return client.stopService()
        return None

    @inlineCallbacks
    def _connected(self, broker: Any) -> Any:
        try:
            avatar = yield login(broker, self.own_node_id.encode(), self.secret.encode())
        except Exception:
            failure = Failure()
            if self._client is not None:
                self._refusals += 1
                log.warn("mesh link to {node_id} ({mesh_point}) refused: {reason}", node_id=self.node_id,
                         mesh_point=self.mesh_point, reason=reason_text(failure))
                broker.transport.loseConnection()
            return
        if self._client is None:  # stopped meanwhile
            broker.transport.loseConnection()
            return
        self._refusals = 0
        self._avatar = avatar
        self.state = UP
        self._last_sent = self._last_reply = self.reactor.seconds()
        broker.notifyOnDisconnect(lambda: self._lost(broker))
        log.info("mesh link to {node_id} ({mesh_point}) up", node_id=self.node_id, mesh_point=self.mesh_point)
        self._schedule_flush()

    def _lost(self, broker: Any) -> None:
        if self._avatar is None or self._avatar.broker is not broker:
            return
        self._avatar = None
        self._in_flight = 0
        if self.state == UP:
            log.info("mesh link to {node_id} ({mesh_point}) down: connection lost",
                     node_id=self.node_id, mesh_point=self.mesh_point)
            self.state = DOWN
        self._fail_all(NODE_UNAVAILABLE)

    # Operations ------------------------------------------------------------------------------

    def send(self, client_id: int, data: bytes, binary: bool) -> Deferred:
        """Deliver to one client of the peer; fires with None or an error text."""
        return self._submit("send", ["send", 0, client_id, data, "binary" if binary else "text"])

    def publish(self, channel: str, data: bytes, binary: bool, now: bool = True) -> Deferred:
        """Publish on the peer; fires with (success, fail) — (0, 0) when it did not answer.

        Sent at once (``now``), not at the end of the turn: the peer's fan-out then runs while
        this engine does its own (``Router.publish`` asks the peers first; with ``now`` False it
        calls ``send_now`` itself after the last publish of a row).
        """
        published = self._submit("publish", ["publish", 0, channel, data, "binary" if binary else "text"])
        if now:
            self.send_now()
        return published

    def call(self, client_id: int, func: str, args: list) -> Deferred:
        """Run a connection method on the peer; fires with None or an error text."""
        return self._submit("call", ["call", 0, client_id, func, json.dumps(args).encode()])

    def submit(self, ops: list[tuple], done: Callable[[list], Any]) -> None:
        """Queue several operations in order; ``done(results)`` once the last one ended.

        Each op is ``("send", client_id, data, binary)``, ``("call", client_id, func, args)`` or
        ``("publish", channel, data, binary)``, or a sibling op ``(kind, *fields)`` (None or the
        peer's error text, connmix_tx/engine/siblings.py); ``results[i]`` is what ``send`` / ``call`` /
        ``publish`` would fire with for ``ops[i]``.  ``done`` runs exactly once, at once when no
        operation could be queued (link down, every one too large).
        """
        if not ops:
            done([])
            return
        group = _Group(len(ops), done)
        now = self.reactor.seconds()
        for index, op in enumerate(ops):
            self._enqueue(op[0], _wire(op), partial(group.settle, index), now)
        self._schedule_flush()

    def submit_one(self, op: tuple, done: Callable[[Any], Any]) -> None:
        """``submit`` for one operation: ``done(result)`` (Lua ``mix.mesh.send``)."""
        self._enqueue(op[0], _wire(op), done, self.reactor.seconds())
        self._schedule_flush()

    def _submit(self, kind: str, op: list) -> Deferred:
        d: Deferred = Deferred()
        self._enqueue(kind, op, d.callback, self.reactor.seconds())
        self._schedule_flush()
        return d

    def _enqueue(self, kind: str, op: list, end: Callable[[Any], Any], now: float) -> None:
        """Queue ``op`` (its seq is set here), or end it at once when it cannot go out."""
        if self.state == DOWN:
            _end(end, _unavailable(kind, NODE_UNAVAILABLE))
            return
        seq = op[1] = next(self._seq)
        packed = msgpack.packb(op, use_bin_type=True)
        if len(packed) > MAX_OP:
            _end(end, _unavailable(kind, MESSAGE_TOO_LARGE))
            return
        self._ops[seq] = _Op(kind, end, now, packed)
        self._queue.append(seq)
        counter = self._out.get(kind)
        (counter if counter is not None else self.meter.op("out", kind)).inc()

    # Batching --------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_call is None and self.state == UP:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def send_now(self) -> None:
        """Flush the queue now and hand the batch to the kernel (the order of the queue holds)."""
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self._flush()
        if self._avatar is not None:
            send_now(self._avatar.broker.transport)

    def _flush(self) -> None:
        self._flush_call = None
        while self._queue and self.state == UP and self._in_flight < MAX_IN_FLIGHT:
            batch, size = _Batch(sent=self.reactor.seconds()), 0
            parts: list[bytes] = []
            while self._queue:
                op = self._ops.get(self._queue[0])
                if op is None:  # timed out while queued
                    self._queue.popleft()
                    continue
                if parts and size + len(op.packed) > MAX_BLOB - ARRAY_HEADER:
                    break
                seq = self._queue.popleft()
                parts.append(op.packed)
                size += len(op.packed)
                batch.seqs.append(seq)
                op.packed = b""
            if not parts:
                return
            packer = msgpack.Packer()
            blob = packer.pack_array_header(len(parts)) + b"".join(parts)
            self._in_flight += 1
            self._batches_out.inc()
            self._last_sent = self.reactor.seconds()
            self._avatar.callRemote("batch", blob).addCallbacks(
                self._answered, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,)
            )

    def _answered(self, blob: bytes, batch: _Batch) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._last_reply = self.reactor.seconds()
        ops = self._ops
        now = self.reactor.seconds()
        observe = self._forward_send.observe
        for seq, status, a, b in msgpack.unpackb(blob, raw=False):
            op = ops.pop(seq, None)
            if op is None:
                continue
            kind = op.kind
            if kind == "send":
                observe(now - op.created)
            _end(op.end, None if status == STATUS_OK and kind != "publish" else _result(kind, status, a, b))
        self._schedule_flush()

    def _batch_failed(self, failure: Failure, batch: _Batch) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        log.debug("mesh batch to {node_id} failed: {reason}", node_id=self.node_id, reason=reason_text(failure))
        for seq in batch.seqs:
            op = self._ops.pop(seq, None)
            if op is not None:
                _end(op.end, _unavailable(op.kind, NODE_UNAVAILABLE))
        self._schedule_flush()

    # Time: timeouts and pings ----------------------------------------------------------------

    def _sweep(self) -> None:
        """Expire operations after meshTimeout; ping an idle peer; drop a silent one."""
        now = self.reactor.seconds()
        for seq in [seq for seq, op in self._ops.items() if now - op.created >= self.mesh_timeout]:
            op = self._ops.pop(seq)
            if op.kind == "publish":
                log.warn("mesh publish to {node_id} got no answer in {timeout}s; counted as 0/0",
                         node_id=self.node_id, timeout=self.mesh_timeout)
            _end(op.end, _unavailable(op.kind, MESH_TIMEOUT))
        if self.state != UP:
            return
        if self._last_sent > self._last_reply and now - self._last_reply >= self.heartbeat_timeout:
            self._drop(f"no answer for {now - self._last_reply:.0f}s")
        elif now - max(self._last_sent, self._last_reply) >= self.heartbeat_interval:
            self._submit("ping", ["ping", 0])

    def _drop(self, reason: str) -> None:
        log.info("mesh link to {node_id} ({mesh_point}) down: {reason}", node_id=self.node_id,
                 mesh_point=self.mesh_point, reason=reason)
        avatar, self._avatar = self._avatar, None
        self.state = DOWN
        self._fail_all(NODE_UNAVAILABLE)
        if avatar is not None:
            avatar.broker.transport.loseConnection()

    def _fail_all(self, reason: str) -> None:
        ops, self._ops = self._ops, {}
        self._queue.clear()
        for op in ops.values():
            _end(op.end, _unavailable(op.kind, reason))

    @property
    def pending(self) -> int:
        """Operations waiting for an answer (queued or in flight)."""
        return len(self._ops)


def _wire(op: tuple) -> list:
    """An operation of ``submit`` in the mesh wire format (its seq, 0 here, is set when queued)."""
    kind = op[0]
    if kind == "call":
        return ["call", 0, op[1], op[2], json.dumps(op[3]).encode()]
    if kind in SIBLING_OPS:  # (kind, *fields): connmix_tx/engine/siblings.py
        return [kind, 0, *op[1:]]
    return [kind, 0, op[1], op[2], "binary" if op[3] else "text"]


def _result(kind: str, status: int, a: Any, b: Any) -> Any:
    if kind == "publish":
        return (int(a or 0), int(b or 0)) if status == STATUS_OK else (0, 0)
    if status == STATUS_OK:
        return None
    if kind == "send":
        return _SEND_ERRORS.get(status) or str(a or "bad request")
    return str(a or "bad request")


def _client_string(host_port: str) -> str:
    host, _, port = host_port.rpartition(":")
    host = host.strip("[]").replace(":", "\\:")
    return f"tcp:{host}:{port}:timeout=5"


class MeshPeers:
    """One ``MeshLink`` per other live engine of the center's node list."""

    def __init__(self, link_factory: Callable[[dict[str, Any]], MeshLink], own_node_id: str) -> None:
        self.link_factory = link_factory
        self.own_node_id = own_node_id
        self.by_id: dict[str, MeshLink] = {}
        self.by_number: dict[int, MeshLink] = {}

    def update(self, nodes: list[dict[str, Any]]) -> None:
        """Apply a node list: dial new engines, close links to engines that left."""
        wanted = {str(n["id"]): n for n in nodes if str(n["id"]) != self.own_node_id}
        for node_id in list(self.by_id):
            link = self.by_id[node_id]
            node = wanted.get(node_id)
            if node is None or str(node["mesh_point"]) != link.mesh_point:
                self._remove(link)
        for node_id, node in wanted.items():
            if node_id not in self.by_id:
                link = self.link_factory(node)
                self.by_id[node_id] = link
                self.by_number[link.number] = link
                link.start()

    def _remove(self, link: MeshLink) -> None:
        log.info("mesh link to {node_id} ({mesh_point}) closed: the engine left the node list",
                 node_id=link.node_id, mesh_point=link.mesh_point)
        del self.by_id[link.node_id]
        if self.by_number.get(link.number) is link:
            del self.by_number[link.number]
        link.stop()

    def link_for(self, number: int) -> MeshLink | None:
        link = self.by_number.get(number)
        return link if link is not None and link.state != DOWN else None

    def links(self) -> list[MeshLink]:
        return [link for link in self.by_id.values() if link.state != DOWN]

    def stop(self) -> None:
        for link in list(self.by_id.values()):
            self._remove(link)

    @property
    def up(self) -> int:
        """Links that are connected right now."""
        return sum(1 for link in self.by_id.values() if link.state == UP)
