"""The mesh point (docs/operations.md, "The mesh"): where other engines deliver operations for this
engine's clients.

Peers log in with their node id and the cluster secret and call ``batch`` with one opaque
msgpack blob of operations; the reply is one blob of results, in the same order.  The wire format
is ``MeshLink``'s; ``apply_batch`` is plain and runs the operations through ``LocalOps``.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from twisted.cred import portal
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from connmix_tx.engine.connections import CLIENT_NOT_FOUND, ENCODE_FAILED, SLOW_CONSUMER
from connmix_tx.engine.outbox import send_now
from connmix_tx.engine.router import CALL_FUNCS, LocalOps, valid_call_args
from connmix_tx.meter import NULL_METER, MeshMeter
from connmix_tx.pb import GuardedPBServerFactory, LoggingPortal, SecretChecker

STATUS_OK, STATUS_NOT_FOUND, STATUS_SLOW, STATUS_ENCODE, STATUS_BAD = 0, 1, 2, 3, 4
_SEND_STATUS = {CLIENT_NOT_FOUND: STATUS_NOT_FOUND, SLOW_CONSUMER: STATUS_SLOW, ENCODE_FAILED: STATUS_ENCODE}

log = Logger(namespace="connmix.mesh")

#: Ops between the workers of one engine; the mesh point hands them to ``local.siblings``.
SIBLING_OPS = frozenset(("consume", "unconsume", "event", "ack"))


def _binary(kind: Any) -> bool:
    return kind in ("binary", b"binary")


class BadOp(ValueError):
    """An operation whose fields have the wrong types."""


def _field(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadOp(f"expected {kind}, got {type(value).__name__}")
    return value


def apply_op(local: LocalOps, op: list) -> list:
    """Run one operation; return ``[seq, status, a, b]``."""
    name, seq = op[0], op[1]
    if name == "send":
        error = local.send(_field(op[2], int), _field(op[3], bytes), _binary(op[4]))
        if error is None:
            return [seq, STATUS_OK, None, None]
        return [seq, _SEND_STATUS.get(error, STATUS_BAD), error, None]
    if name == "publish":
        success, fail = local.publish(_field(op[2], str), _field(op[3], bytes), _binary(op[4]))
        return [seq, STATUS_OK, success, fail]
    if name == "call":
        client_id, func = _field(op[2], int), _field(op[3], str)
        args = json.loads(_field(op[4], bytes))
        if func not in CALL_FUNCS or not valid_call_args(func, args):
            return [seq, STATUS_BAD, f"bad request: wrong func or args ({func})", None]
        error = local.call(client_id, func, args)
        if error is None:
            return [seq, STATUS_OK, None, None]
        status = STATUS_NOT_FOUND if local.connections.get(client_id) is None else STATUS_BAD
        return [seq, status, error, None]
    if name == "ping":
        return [seq, STATUS_OK, None, None]
    if name in SIBLING_OPS:  # queues across the workers of one engine (connmix_tx/engine/siblings.py)
        siblings = local.siblings
        if siblings is None:
            return [seq, STATUS_BAD, "bad request: no sibling queues here", None]
        status, a = siblings.apply(name, op[2:])
        return [seq, status, a, None]
    return [seq, STATUS_BAD, f"unknown op {name!r}", None]


#: The operations counted by name in ``connmix_engine_mesh_messages{direction="in"}`` (a peer
#: cannot grow the label values with made-up names).
COUNTED_OPS = frozenset(("send", "publish", "call"))


def apply_batch(local: LocalOps, blob: bytes, meter: MeshMeter = NULL_METER) -> bytes:
    """Run every operation of a batch blob; return the reply blob."""
    ops = msgpack.unpackb(blob, raw=False)
    replies = []
    for op in ops:
        try:
            if op[0] in COUNTED_OPS:
                meter.op("in", op[0]).inc()
            replies.append(apply_op(local, op))
        except Exception as e:  # one malformed op must not fail the others
            seq = op[1] if isinstance(op, list) and len(op) > 1 else None
            log.debug("mesh op {op!r} failed: {error}", op=op[:1] if isinstance(op, list) else op, error=e)
            replies.append([seq, STATUS_BAD, f"bad request: {e}", None])
    return msgpack.packb(replies, use_bin_type=True)


class MeshPeerAvatar(pb.Avatar):
    """One engine logged in to this mesh point.

    With a ``clock``, the answer to a batch is handed to the kernel at the start of the next
    turn, ahead of the client writes the batch made (``connmix_tx/engine/outbox.py`` sends those
    then too): the peer's waiting callbacks resume while this engine writes to its clients.
    """

    def __init__(self, local: LocalOps, peer_node_id: str, meter: MeshMeter = NULL_METER,
                 clock: IReactorTime | None = None) -> None:
        self.local = local
        self.peer_node_id = peer_node_id
        self.meter = meter
        self.clock = clock
        self._batches_in = meter.batch("in")

    def perspectiveMessageReceived(self, broker: Any, message: Any, args: Any, kw: Any) -> Any:
        if self.clock is not None:
            self.clock.callLater(0, send_now, broker.transport)  # before the batch's client writes
        return super().perspectiveMessageReceived(broker, message, args, kw)

    def perspective_batch(self, blob: bytes) -> bytes:
        self._batches_in.inc()
        return apply_batch(self.local, blob, self.meter)


@implementer(portal.IRealm)
class MeshRealm:
    def __init__(self, local: LocalOps, meter: MeshMeter = NULL_METER, clock: IReactorTime | None = None) -> None:
        self.local = local
        self.meter = meter
        self.clock = clock

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("PB only")
        peer = avatar_id.decode() if isinstance(avatar_id, bytes) else str(avatar_id)
        return pb.IPerspective, MeshPeerAvatar(self.local, peer, self.meter, self.clock), lambda: None


def mesh_factory(local: LocalOps, secret: str, meter: MeshMeter = NULL_METER) -> pb.PBServerFactory:
    """The PB factory served on ``engine.meshPoint``."""
    realm = LoggingPortal(MeshRealm(local, meter), [SecretChecker(secret)], "mesh")
    return GuardedPBServerFactory(realm, secret, "mesh")
