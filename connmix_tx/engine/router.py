"""Routing of send / publish / call to connections anywhere in the cluster (docs/operations.md,
"Routing").

The node number inside a client id names the engine that holds it.  Own number: the operation runs
here, synchronously.  Another number: it goes to that engine's mesh link, and the result comes back
as a Deferred.  ``LocalOps`` is the part that runs on the owning engine, for local callers and for
requests arriving over the mesh alike.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, Optional, Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from connmix_tx.engine.connections import (
    CLIENT_NOT_FOUND,
    ClientConnection,
    ConnectionRegistry,
)
from connmix_tx.names import valid_name
from connmix_tx.ids import node_number_of
from connmix_tx.later import Later
from connmix_tx.meter import NULL_METER, MeshMeter

log = Logger(namespace="connmix.mesh")

NODE_UNAVAILABLE = "node unavailable"

#: An error text (None on success), now or later (callers use ``connmix_tx.later.when_ready``).
SendResult = Later[Optional[str]]
#: (success count, fail count), now or later.
PublishResult = Later[tuple[int, int]]

CALL_FUNCS = ("set_context_value", "set_context", "subscribe", "unsubscribe", "close")


def valid_call_args(func: str, args: Any) -> bool:
    """Whether ``args`` (JSON-decoded) have the shape ``func`` takes (docs/api.md, conn.call)."""
    if not isinstance(args, list):
        return False
    if func == "set_context_value":
        return len(args) == 2 and isinstance(args[0], (str, int)) and not isinstance(args[0], bool)
    if func == "set_context":
        return len(args) == 1 and isinstance(args[0], dict)
    if func in ("subscribe", "unsubscribe"):
        return len(args) >= 1 and all(valid_name(a) for a in args)
    if func == "close":
        return not args
    return False


class MeshPeers(Protocol):
    """The mesh side of routing: links to the other engines (cluster issue)."""

    def link_for(self, number: int) -> Any | None:
        """The live link to engine ``number``, or None."""

    def links(self) -> list[Any]:
        """Every live link."""


class LocalOps:
    """Operations on connections of this engine."""

    def __init__(self, connections: ConnectionRegistry) -> None:
        self.connections = connections
        #: The queues across the workers of this engine (``engine.siblings.SiblingQueues``), which
        #: the mesh point hands the workers' queue ops to; None in a one-process engine.
        self.siblings: Any = None

    def send(self, client_id: int, data: bytes, binary: bool) -> str | None:
        conn = self.connections.get(client_id)
        if conn is None:
            return CLIENT_NOT_FOUND
        transport = conn.transport
        start = perf_counter()
        error = transport.deliver(data, binary, {})
        transport.meter.local_send.observe(perf_counter() - start)
        return error

    def publish(self, channel: str, data: bytes, binary: bool) -> tuple[int, int]:
        shared: dict[str, Any] = {}
        success = fail = 0
        for conn in self.connections.subscribers(channel):
            if conn.transport.deliver(data, binary, shared) is None:
                success += 1
            else:
                fail += 1
        return success, fail

    def call(self, client_id: int, func: str, args: list[Any]) -> str | None:
        """Apply a validated ``conn.call``; return an error text or None."""
        conn = self.connections.get(client_id)
        if conn is None:
            return f"client {client_id} not found"
        return apply_call(self.connections, conn, func, args)


def apply_call(
    connections: ConnectionRegistry, conn: ClientConnection, func: str, args: list[Any]
) -> str | None:
    """Run one connection method with JSON-decoded arguments (shape already validated)."""
    if func == "set_context_value":
        conn.set_context_value(str(args[0]), args[1])
    elif func == "set_context":
        conn.set_context({str(k): v for k, v in args[0].items()})
    elif func == "subscribe":
        return connections.subscribe(conn, list(args))
    elif func == "unsubscribe":
        connections.unsubscribe(conn, list(args))
    elif func == "close":
        conn.transport.close_connection()
    else:
        return f"unknown func {func}"
    return None


class Router:
    """Routes by the node bits of a client id: local operations or the mesh."""

    def __init__(self, node_number: int, local: LocalOps, peers: MeshPeers | None = None,
                 meter: MeshMeter = NULL_METER) -> None:
        self.node_number = node_number
        self.local = local
        self.peers = peers
        #: Publishes whose local fan-out waits for ``release_publishes`` (None: not holding).
        self._held: list[tuple[str, bytes, bool, Deferred]] | None = None
        self._held_links: dict[Any, None] = {}

    # Publishes of one API read ---------------------------------------------------------------

    def hold_publishes(self) -> None:
        """Until ``release_publishes``: a publish queues its operations for the other engines and
        holds back its own fan-out, so that the remote parts of several publishes in a row leave
        in one batch before the first local fan-out starts (each engine then fans out all of them
        in one turn, one ``send`` per client: docs/performance.md, "Publishes of one read").

        Any other routing call first runs what is held, so the order of one connection's
        requests holds for every client.
        """
        self._held = []

    def release_publishes(self) -> None:
        """Run what ``hold_publishes`` held back, and stop holding."""
        self._run_held()
        self._held = None

    def _run_held(self) -> None:
        held = self._held
        if not held and not self._held_links:
            return
        self._held = []
        links, self._held_links = self._held_links, {}
        for link in links:
            link.send_now()
        for channel, data, binary, local in held or ():
            try:
                counts = self.local.publish(channel, data, binary)
            except Exception:  # the publishes after it, and the API read, go on
                log.failure("publish to {channel} failed here", channel=channel)
                counts = (0, 0)
            local.callback(counts)

    def route(self, client_id: int) -> Any:
        """Where ``client_id`` lives: None (here), its engine's live link, or ``NODE_UNAVAILABLE``."""
        if self._held:
            self._run_held()
        number = node_number_of(client_id)
        if number == self.node_number:
            return None
        link = self.peers.link_for(number) if self.peers else None
        return NODE_UNAVAILABLE if link is None else link

    def forward(self, link: Any, ops: list[tuple], done: Callable[[list], Any]) -> None:
        """Send the operations of one API read to ``link`` (see ``MeshLink.submit``)."""
        if self._held:
            self._run_held()
        link.submit(ops, done)

    def send(self, client_id: int, data: bytes, binary: bool) -> SendResult:
        if self._held:
            self._run_held()
        number = node_number_of(client_id)
        if number == self.node_number:
            return self.local.send(client_id, data, binary)
        link = self.peers.link_for(number) if self.peers else None
        if link is None:
            return NODE_UNAVAILABLE
        return link.send(client_id, data, binary)

    def call(self, client_id: int, func: str, args: list[Any]) -> SendResult:
        if self._held:
            self._run_held()
        number = node_number_of(client_id)
        if number == self.node_number:
            return self.local.call(client_id, func, args)
        link = self.peers.link_for(number) if self.peers else None
        if link is None:
            return NODE_UNAVAILABLE
        return link.call(client_id, func, args)

    def publish(self, channel: str, data: bytes, binary: bool) -> PublishResult:
        links = self.peers.links() if self.peers else []
        if not links:
            return self.local.publish(channel, data, binary)
        # The peers first: their fan-outs run while this engine does its own.
        held = self._held
        results = [link.publish(channel, data, binary, now=held is None).addErrback(_no_counts)
                   for link in links]
        if held is None:
            results.append(succeed(self.local.publish(channel, data, binary)))
        else:
            self._held_links.update(dict.fromkeys(links))
            local: Deferred = Deferred()
            held.append((channel, data, binary, local))
            results.append(local)
        return gatherResults(results).addCallback(_total)


def _total(results: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(r[0] for r in results), sum(r[1] for r in results)


def _no_counts(failure: Any) -> tuple[int, int]:
    """A peer that failed to answer a publish counts as 0/0 (docs/operations.md, "Routing")."""
    return 0, 0
