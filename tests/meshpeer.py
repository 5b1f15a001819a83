"""A peer engine in memory for mesh-link tests: its clients, its real mesh point, a batch recorder.

``Peer`` serves ``mesh_factory(LocalOps(registry), secret)`` through a ``connmix_tx.testing``
``MemoryEndpoint``; its clients have ``FakeClientTransport``s that record deliveries.  ``Batches`` wraps the mesh point's
``perspective_batch`` to record every batch and, with ``holding`` set, keep replies back (a peer
that does not answer) until ``release``.
"""

from __future__ import annotations

from typing import Any

import msgpack
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from connmix_tx.engine.connections import ClientConnection, ConnectionRegistry
from connmix_tx.engine.mesh import MeshPeerAvatar, apply_batch, mesh_factory
from connmix_tx.engine.mesh_link import MeshLink
from connmix_tx.engine.router import LocalOps
from connmix_tx.ids import TWITTER_EPOCH_MS
from connmix_tx.testing import FakeClientTransport, MemoryEndpoint


SECRET = "s3cret"
OWN_ID = "c8u7jfbin5659oh0b13g"
NOW_MS = 1_700_000_000_000
MESH_TIMEOUT = 2.0
WAITING = "<waiting>"


def client_id(number: int, seq: int = 1) -> int:
    """A snowflake client id held by engine ``number``."""
    return ((NOW_MS - TWITTER_EPOCH_MS) << 22) | (number << 12) | seq


def results(*deferreds: Deferred) -> list:
    """What each Deferred fired with so far (``WAITING`` for those that did not fire)."""
    out: list = []
    for d in deferreds:
        box: list = []
        d.addBoth(lambda r, box=box: box.append(r) or r)
        out.append(box[0] if box else WAITING)
    return out


def add_client(connections: ConnectionRegistry, cid: int, error: str | None = None,
               channels: tuple = ()) -> ClientConnection:
    """A ready connection ``cid`` in ``connections``, subscribed to ``channels``."""
    conn = ClientConnection(cid, "203.0.113.9:5000", FakeClientTransport(error))
    conn.ready = True
    connections.add(conn)
    connections.subscribe(conn, list(channels))
    return conn


class Batches:
    """What the mesh points receive: (mesh point's LocalOps, decoded ops, blob size) per batch."""

    def __init__(self, monkeypatch: Any) -> None:
        self.received: list[tuple[LocalOps, list, int]] = []
        self.holding = False
        self.held: list[tuple[Deferred, LocalOps, bytes]] = []
        monkeypatch.setattr(MeshPeerAvatar, "perspective_batch", lambda avatar, blob: self._batch(avatar, blob))

    def _batch(self, avatar: MeshPeerAvatar, blob: bytes) -> Any:
        self.received.append((avatar.local, msgpack.unpackb(blob, raw=False), len(blob)))
        if not self.holding:
            return apply_batch(avatar.local, blob)
        d: Deferred = Deferred()
        self.held.append((d, avatar.local, blob))
        return d

    def release(self, count: int | None = None) -> None:
        """Answer the first ``count`` held batches (all by default)."""
        count = len(self.held) if count is None else count
        held, self.held = self.held[:count], self.held[count:]
        for d, local, blob in held:
            d.callback(apply_batch(local, blob))

    def ops(self, kind: str | None = None) -> list[list]:
        return [op for _, ops, _ in self.received for op in ops if kind in (None, op[0])]

    @property
    def sizes(self) -> list[int]:
        return [size for _, _, size in self.received]


class Peer:
    """Another engine: its clients, its mesh point, the endpoint that reaches it."""

    def __init__(self, clock: Clock, number: int) -> None:
        self.clock = clock
        self.connections = ConnectionRegistry()
        self.local = LocalOps(self.connections)
        self.endpoint = MemoryEndpoint(mesh_factory(self.local, SECRET), clock)
        self.node = {"id": f"peer{number}", "number": number, "mesh_point": f"10.0.0.{number}:6788"}

    def client(self, seq: int = 1, error: str | None = None, channels: tuple = ()) -> ClientConnection:
        return add_client(self.connections, client_id(self.node["number"], seq), error, channels)

    def link(self, node: dict | None = None, secret: str = SECRET) -> MeshLink:
        return MeshLink(self.clock, node or self.node, OWN_ID, secret, mesh_timeout=MESH_TIMEOUT,
                        heartbeat_interval=5.0, heartbeat_timeout=15.0, endpoint=self.endpoint)
