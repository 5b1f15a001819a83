"""Writes to client sockets, handed to the kernel once per reactor turn (docs/performance.md,
"Writing to clients").

``transport.write`` queues the bytes and registers the socket for writability (one
``epoll_ctl``); on the next turn the reactor finds it writable, sends, and unregisters it (another
``epoll_ctl``): three system calls and a reactor dispatch for every connection written in a turn.
``Outbox.write`` queues the bytes in the same place, Twisted's own buffer, without the
registration, and sends the buffers of every connection written in the turn at its end
(``callLater(0)``): one ``send`` each.  Only what the kernel does not take at once goes the
reactor's way.

Because the bytes sit in Twisted's buffer, everything else keeps working unchanged: order with
what Autobahn writes itself (pongs, close frames), ``buffered_bytes`` and the slow-consumer check,
the write watch (the sends go through ``writeSomeData``), ``loseConnection`` flushing first and
``abortConnection`` dropping the queue.  Transports of any other kind (TLS wrappers, test fakes,
a producer registered) get a plain ``write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger(namespace="connmix.engine")

#: Socket transports whose buffer layout (``dataBuffer`` / ``offset`` / ``_tempDataBuffer`` /
#: ``_tempDataLen``) ``Outbox`` relies on; ``test_outbox`` pins it for the installed Twisted.
_SOCKET_TRANSPORTS = (tcp.Server, tcp.Client)


def _queued(transport: Any) -> int:
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def send_now(transport: Any) -> None:
    """Hand what Twisted queued for a socket transport to the kernel now, not at the next turn.

    What the kernel does not take, or an error, is left to the reactor as for any write.
    """
    if type(transport) not in _SOCKET_TRANSPORTS:
        return
    if not transport.connected or transport.disconnecting or transport._aborting or not _queued(transport):
        return  # closed or aborted (queue dropped), closing (Twisted flushes), or sent already
    try:
        failed = transport.doWrite()
    except Exception:
        log.failure("direct write failed")
        failed = True
    if failed is not None or _queued(transport):
        transport.startWriting()


class Outbox:
    """The client sockets written in this turn of the reactor; sent at its end."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._written: dict[Any, None] = {}  # insertion-ordered set
        self._call: IDelayedCall | None = None

    def write(self, transport: Any, data: bytes) -> None:
        """``transport.write(data)``, sent with the turn's other writes to the same socket."""
        if type(transport) not in _SOCKET_TRANSPORTS or transport.producer is not None:
            transport.write(data)
            return
        if not transport.connected or transport._writeDisconnected or not data:
            return  # what transport.write does then
        transport._tempDataBuffer.append(data)
        transport._tempDataLen += len(data)
        if transport not in self._written:
            self._written[transport] = None
            if self._call is None:
                self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send what this turn queued; what the kernel does not take waits for writability."""
        self._call = None
        written, self._written = self._written, {}
        for transport in written:
            send_now(transport)

    @property
    def pending(self) -> int:
        """Connections written in this turn and not yet sent (for tests)."""
        return len(self._written)
