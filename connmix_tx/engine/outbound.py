"""Outbound limits of one connection (``writeTimeout`` / ``maxWriteBuffer``;
docs/robustness.md, "Clients").

Twisted queues what a protocol writes in the transport and hands it to the kernel when the socket
is writable; a peer that stops reading makes that queue grow without bound.  Two guards keep it
bounded, shared by the websocket and socket protocol servers and the API server:

* ``buffered_bytes(transport)`` is read after every write; above the connection's
  ``maxWriteBuffer`` the protocol closes it as a slow consumer.
* ``WriteWatch`` (one per server, one timer for all its connections) aborts a connection whose
  queue has not moved for its ``writeTimeout`` seconds.

Twisted has no public accessor for the queue: ``FileDescriptor`` keeps it in ``dataBuffer`` (from
``offset``) plus ``_tempDataBuffer`` / ``_tempDataLen``.  Under TLS the protocol's transport is a
``TLSMemoryBIOProtocol`` (a wrapper) whose own transport holds the encrypted bytes; it also keeps
plaintext written before the handshake finished in ``_appSendBuffer``.  Both are walked here, and
a transport of any other kind (test fakes, HTTP/2) reports 0.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

#: Socket transports whose queue layout (``dataBuffer`` from ``offset``, ``_tempDataBuffer`` /
#: ``_tempDataLen``) is read here and written by ``engine/outbox.py``; ``test_outbox`` pins it.
SOCKET_TRANSPORTS = (tcp.Server, tcp.Client)

#: How often ``WriteWatch`` looks at its connections: a stuck connection is aborted between
#: ``writeTimeout`` and ``writeTimeout + TICK`` seconds after its queue last moved.
TICK = 0.5
_MAX_WRAPPERS = 4


def _socket_transport(transport: Any) -> tuple[Any, int]:
    """The transport that owns the socket queue below ``transport``, and the plaintext bytes that
    TLS wrappers on the way still hold (written before their handshake finished)."""
    held = 0
    for _ in range(_MAX_WRAPPERS):
        if transport is None or hasattr(transport, "dataBuffer"):
            return transport, held
        pending = getattr(transport, "_appSendBuffer", None)
        if pending:
            held += sum(len(chunk) for chunk in pending)
        transport = getattr(transport, "transport", None)
    return None, held


def pause_reading(transport: Any) -> None:
    """Stop reading from the socket below ``transport`` (TLS wrappers have no pauseProducing)."""
    if type(transport) in SOCKET_TRANSPORTS:
        transport.pauseProducing()
        return
    fd, _ = _socket_transport(transport)
    target = fd if fd is not None else transport
    pause = getattr(target, "pauseProducing", None)
    if pause is not None:
        pause()


def resume_reading(transport: Any) -> None:
    """Undo ``pause_reading``."""
    if type(transport) in SOCKET_TRANSPORTS:
        transport.resumeProducing()
        return
    fd, _ = _socket_transport(transport)
    target = fd if fd is not None else transport
    resume = getattr(target, "resumeProducing", None)
    if resume is not None:
        resume()


def buffered_bytes(transport: Any) -> int:
    """Bytes written to ``transport`` and not yet accepted by the kernel (0 when unknown)."""
    if type(transport) in SOCKET_TRANSPORTS:  # the common case, once per delivery
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    fd, held = _socket_transport(transport)
    try:
        return held + len(fd.dataBuffer) - fd.offset + fd._tempDataLen
    except AttributeError:
        return held


class _SentCounter:
    """Wraps a socket transport's ``writeSomeData`` to count the bytes the kernel accepted.

    Installed on a transport the first time ``WriteWatch`` looks at it (once per connection,
    only for connections that ever had bytes queued): a monotonic count is the only exact
    progress mark, since the queue can drain and refill between two looks.
    """

    __slots__ = ("inner", "sent")

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent = 0

    def __call__(self, data: Any) -> Any:
        result = self.inner(data)
        if type(result) is int and result > 0:
            self.sent += result
        return result


def _progress_mark(transport: Any) -> tuple[Any, ...]:
    """Changes whenever the kernel accepted bytes from the queue since the last mark."""
    fd, held = _socket_transport(transport)
    if fd is None:
        return (0, held)
    counter = fd.__dict__.get("writeSomeData") if hasattr(fd, "__dict__") else None
    if not isinstance(counter, _SentCounter):
        inner = getattr(fd, "writeSomeData", None)
        if inner is None:
            return (id(fd.dataBuffer), getattr(fd, "offset", 0), held)
        counter = fd.writeSomeData = _SentCounter(inner)
    return (counter.sent, held)


class Watched(Protocol):
    """A connection a ``WriteWatch`` can look after."""

    transport: Any
    @property
    def write_timeout(self) -> float:
        """The connection's ``writeTimeout`` (fixed when it was accepted: a "new conns" key)."""

    def write_timed_out(self) -> None:
        """Called once when the queue made no progress for ``write_timeout`` seconds."""


class WriteWatch:
    """Aborts connections whose outbound queue stayed stuck for their ``writeTimeout``.

    ``written(conn)`` is called after a write that left bytes queued; the watch then looks at the
    connection every ``TICK`` seconds until its queue is empty.  The timer runs only while some
    connection of the server has something queued.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._watched: dict[Watched, list] = {}   # conn -> [progress mark, since]
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def __len__(self) -> int:
        return len(self._watched)

    def written(self, conn: Watched) -> None:
        """``conn`` has bytes queued: watch it (cheap when it is watched already)."""
        if conn in self._watched or conn.write_timeout <= 0:
            return
        self._watched[conn] = [_progress_mark(conn.transport), self.clock.seconds()]
        if not self._loop.running:
            self._loop.start(TICK, now=False)

    def forget(self, conn: Watched) -> None:
        """``conn`` closed."""
        self._watched.pop(conn, None)

    def stop(self) -> None:
        """The server stops."""
        self._watched.clear()
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        expired = []
        for conn, state in list(self._watched.items()):
            transport = conn.transport
            if transport is None or buffered_bytes(transport) == 0:
                del self._watched[conn]
                continue
            mark = _progress_mark(transport)
            if mark != state[0]:
                state[0], state[1] = mark, now
            elif now - state[1] >= conn.write_timeout:
                del self._watched[conn]
                expired.append(conn)
        if not self._watched and self._loop.running:
            self._loop.stop()
        for conn in expired:
            conn.write_timed_out()
