"""The center's list of live engines and their node numbers (docs/operations.md, "The cluster").

A plain class with the clock injected: registration, heartbeats, failure detection, number
reservation.  The PB layer (``center/pb.py``) calls it and pushes node lists to engines when it
reports a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from connmix_tx.ids import MAX_NODE_NUMBER


log = Logger(namespace="connmix.registry")

class RegistryError(Exception):
    """A registration was refused; the text says why."""


@dataclass
class EngineRecord:
    """One live engine as the center sees it."""

    node_id: str
    number: int
    host: str
    api_port: int
    mesh_port: int
    version: str
    registered_at: float
    last_seen: float
    clients: int = 0
    channels: int = 0
    #: The engine this node is a worker of (shared by the workers of one supervisor) and its index.
    engine: str = ""
    worker: int = 0
    mind: Any = field(default=None, repr=False, compare=False)

    @property
    def api_server(self) -> str:
        return _host_port(self.host, self.api_port)

    @property
    def mesh_point(self) -> str:
        return _host_port(self.host, self.mesh_port)

    def describe(self) -> dict[str, Any]:
        """The node as ``/v1/nodes`` and node-list pushes show it (docs/api.md)."""
        return {
            "id": self.node_id,
            "number": self.number,
            "api_server": self.api_server,
            "mesh_point": self.mesh_point,
            "host": self.host,
            "version": self.version,
            "clients": self.clients,
            "channels": self.channels,
            "registered_at": int(self.registered_at),
            "last_seen": int(self.last_seen),
            "engine": self.engine or self.node_id,
            "worker": self.worker,
        }


def _worker_index(value: Any) -> int:
    """The ``worker`` of registration info: a small non-negative integer, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1024:
        return value
    return 0


def _host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:6789``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Registry:
    """Live engines by node id; numbers held by them or reserved after they went down."""

    def __init__(
        self,
        clock: IReactorTime,
        heartbeat_timeout: float = 15.0,
        number_reserve: float = 60.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.number_reserve = number_reserve
        self.on_change = on_change
        self.engines: dict[str, EngineRecord] = {}
        self._reserved: dict[int, tuple[str, float]] = {}  # number -> (node_id, until)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def start(self, interval: float) -> None:
        """Check for silent engines every ``interval`` seconds."""
        self._sweeper.start(interval, now=False)

    def stop(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()

    # Registration ----------------------------------------------------------------------------

    def register(
        self,
        node_id: str,
        info: dict[str, Any],
        peer_host: str,
        mind: Any = None,
    ) -> EngineRecord:
        """Register (or re-register) an engine; return its record.  Raise RegistryError.

        ``info`` carries ``api_server_port``, ``mesh_point_port``, ``advertise_host``, ``version``,
        ``engine`` and ``worker`` (which engine this node is a worker process of, and its index;
        an engine without them is its own engine, worker 0) and, when the engine registers
        again, the ``number`` it holds.
        """
        now = self.clock.seconds()
        self._expire_reservations(now)
        claimed = info.get("number")
        previous = self.engines.get(node_id)
        if claimed is not None:
            number = self._claim(node_id, int(claimed))
        elif previous is not None:
            number = previous.number
        else:
            number = self._lowest_free(node_id)
        self._reserved.pop(number, None)
        record = EngineRecord(
            node_id=node_id,
            number=number,
            host=str(info.get("advertise_host") or peer_host),
            api_port=int(info["api_server_port"]),
            mesh_port=int(info["mesh_point_port"]),
            version=str(info.get("version", "")),
            engine=str(info.get("engine") or node_id),
            worker=_worker_index(info.get("worker")),
            registered_at=previous.registered_at if previous else now,
            last_seen=now,
            mind=mind,
        )
        self.engines[node_id] = record
        log.info(
            "register node {peer_ip} node_id {node_id} number {number}",
            peer_ip=peer_host,
            node_id=node_id,
            number=number,
        )
        self._changed()
        return record

    def _claim(self, node_id: str, number: int) -> int:
        if not 0 <= number <= MAX_NODE_NUMBER:
            raise RegistryError(f"node number {number} outside 0-{MAX_NODE_NUMBER}")
        for other in self.engines.values():
            if other.number == number and other.node_id != node_id:
                raise RegistryError(f"node number {number} is held by {other.node_id}")
        holder = self._reserved.get(number)
        if holder is not None and holder[0] != node_id:
            raise RegistryError(f"node number {number} is reserved for {holder[0]}")
        return number

    def _lowest_free(self, node_id: str) -> int:
        taken = {e.number for e in self.engines.values()}
        taken.update(n for n, (owner, _) in self._reserved.items() if owner != node_id)
        for number in range(MAX_NODE_NUMBER + 1):
            if number not in taken:
                return number
        raise RegistryError(f"no free node number: {MAX_NODE_NUMBER + 1} engines registered")

    # Liveness --------------------------------------------------------------------------------

    def heartbeat(self, node_id: str, stats: dict[str, Any]) -> bool:
        """Record a heartbeat; False when the engine is not (or no longer) registered."""
        record = self.engines.get(node_id)
        if record is None:
            return False
        record.last_seen = self.clock.seconds()
        record.clients = int(stats.get("clients", record.clients))
        record.channels = int(stats.get("channels", record.channels))
        return True

    def drop(self, node_id: str, reason: str, mind: Any = None) -> None:
        """Mark an engine down; keep its number reserved for ``number_reserve`` seconds.

        With ``mind`` given, only drop the engine if that is still its current connection (a
        stale connection closing after a re-registration must not remove the new one).
        """
        record = self.engines.get(node_id)
        if record is None or (mind is not None and record.mind is not mind):
            return
        del self.engines[node_id]
        self._reserved[record.number] = (node_id, self.clock.seconds() + self.number_reserve)
        log.info(
            "engine {node_id} number {number} down: {reason}",
            node_id=node_id,
            number=record.number,
            reason=reason,
        )
        self._changed()

    def sweep(self) -> None:
        """Drop engines silent for longer than the heartbeat timeout; free old reservations."""
        now = self.clock.seconds()
        for record in list(self.engines.values()):
            if now - record.last_seen > self.heartbeat_timeout:
                self.drop(record.node_id, "heartbeat timeout")
        self._expire_reservations(now)

    def _expire_reservations(self, now: float) -> None:
        for number, (_, until) in list(self._reserved.items()):
            if until <= now:
                del self._reserved[number]

    # Views -----------------------------------------------------------------------------------

    def nodes(self) -> list[EngineRecord]:
        """Live engines sorted by number."""
        return sorted(self.engines.values(), key=lambda r: r.number)

    def describe(self) -> list[dict[str, Any]]:
        return [record.describe() for record in self.nodes()]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
