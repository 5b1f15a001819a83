"""In-memory PB connections: a client endpoint joined to a real server factory, driven by a Clock.

``MemoryEndpoint.connect(factory)`` builds the client protocol with ``factory.buildProtocol`` (what
``ClientService`` hands it is a proxy: that is what we return), builds the server protocol from the
real server factory, joins both with ``twisted.test.iosim`` transports and keeps the ``IOPump``.
Nothing moves until a test pumps; time moves only when a test advances the ``Clock``.  The center
link and the mesh links take such an endpoint in place of a TCP one.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.test import iosim

SERVER_ADDR = IPv4Address("TCP", "127.0.0.1", 6788)
CLIENT_ADDR = IPv4Address("TCP", "127.0.0.1", 50123)


class MemoryEndpoint:
    """A client endpoint (``IStreamClientEndpoint``) whose connections reach ``server_factory`` in memory.

    ``refuse`` fails attempts at once (connection refused); ``hang`` leaves them pending forever.
    ``attempts`` counts every ``connect``.
    """

    def __init__(self, server_factory: Any, clock: Clock) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.attempts = 0
        self.refuse = False
        self.hang = False

    def connect(self, factory: Any) -> Deferred:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError("in-memory peer refused"))
        if self.hang:
            return Deferred()
        client = factory.buildProtocol(SERVER_ADDR)
        server = self.server_factory.buildProtocol(CLIENT_ADDR)
        client_io = iosim.FakeTransport(client, False, CLIENT_ADDR, SERVER_ADDR)
        server_io = iosim.FakeTransport(server, True, SERVER_ADDR, CLIENT_ADDR)
        pump = iosim.connect(server, server_io, client, client_io, greet=False, clock=self.clock)
        self.pumps.append(pump)
        return succeed(client)

    @property
    def pump(self) -> iosim.IOPump:
        """The pump of the newest connection."""
        return self.pumps[-1]

    def flush(self) -> None:
        """Move every byte of every connection (and run ``callLater(0)`` calls)."""
        for pump in self.pumps:
            pump.flush()

    def lose(self) -> None:
        """The newest connection breaks (the client side closes, both sides learn of it)."""
        self.pump.clientIO.loseConnection()
        self.pump.flush()


def tick(clock: Clock, seconds: float, endpoints: Iterable[MemoryEndpoint] = (), step: float = 0.25) -> None:
    """Advance ``clock`` in ``step``s, flushing the connections of ``endpoints`` after each step."""
    endpoints = list(endpoints)
    steps = round(seconds / step)
    for _ in range(steps):
        clock.advance(step)
        for endpoint in endpoints:
            endpoint.flush()
