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

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from connmix_tx.engine.outbound import SOCKET_TRANSPORTS, WriteWatch

log = Logger(namespace="connmix.engine")


def send_now(transport: Any) -> bool:
    """Hand what Twisted queued for a socket transport to the kernel now, not at the next turn.

    One ``send`` through the transport's ``writeSomeData`` (so the write watch's byte count sees
    it); what the kernel does not take, or an error, is left to the reactor as for any write.
    Returns whether bytes stay queued.
    """
    if type(transport) not in SOCKET_TRANSPORTS:
        return False
    if not transport.connected or transport.disconnecting or transport._aborting:
        return False  # closed or aborted (queue dropped), or closing (Twisted flushes it)
    if len(transport.dataBuffer) > transport.offset:
        transport.startWriting()  # older bytes wait for writability: the rest queues behind them
        return True
    chunks = transport._tempDataBuffer
    if not chunks:
        return False
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    sent = transport.writeSomeData(data)
    transport._tempDataBuffer, transport._tempDataLen = [], 0
    if type(sent) is int and sent == len(data):
        transport.dataBuffer, transport.offset = b"", 0
        return False
    transport.dataBuffer, transport.offset = data, sent if type(sent) is int and sent > 0 else 0
    transport.startWriting()
    return True


class Outbox:
    """The client sockets written in this turn of the reactor; sent at its end.

    ``watch`` (the server's ``WriteWatch``) is told about a connection whose bytes the kernel did
    not all take at the flush; until then ``holds(transport)`` says the turn will send them.
    """

    def __init__(self, clock: IReactorTime, watch: WriteWatch | None = None) -> None:
        self._clock = clock
        self._watch = watch
        self._written: dict[Any, Any] = {}  # transport -> the connection to watch (insertion order)
        self._call: IDelayedCall | None = None

    def write(self, transport: Any, data: bytes, conn: Any = None) -> None:
        """``transport.write(data)``, sent with the turn's other writes to the same socket;
        ``conn`` is what the write watch looks after if the kernel does not take it all."""
        if type(transport) not in SOCKET_TRANSPORTS or transport.producer is not None:
            transport.write(data)
            return
        if not transport.connected or transport._writeDisconnected or not data:
            return  # what transport.write does then
        transport._tempDataBuffer.append(data)
        transport._tempDataLen += len(data)
        if transport not in self._written:
            self._written[transport] = conn
            if self._call is None:
                self._call = self._clock.callLater(0, self.flush)

    def holds(self, transport: Any) -> bool:
        """Whether this turn's flush will send ``transport``'s queued bytes."""
        return transport in self._written

    def flush(self) -> None:
        """Send what this turn queued; what the kernel does not take waits for writability."""
        self._call = None
        written, self._written = self._written, {}
        watch = self._watch
        for transport, conn in written.items():
            try:
                left = send_now(transport)
            except Exception:
                log.failure("direct write failed")
                continue
            if left and conn is not None and watch is not None:
                watch.written(conn)

    @property
    def pending(self) -> int:
        """Connections written in this turn and not yet sent (for tests)."""
        return len(self._written)
