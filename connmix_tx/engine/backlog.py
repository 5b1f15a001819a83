"""Read no further from a client whose Lua callbacks are behind (docs/robustness.md, "Clients";
docs/performance.md, "Reading behind a waiting callback").

While a connection's callback waits (a remote ``mix.mesh.send``, ``mix.http.request``, Redis) its
next messages queue in its ``CallbackSession``.  Reading on meanwhile only moves them from the
kernel into that queue, one small read per message, and a client that sends faster than its
callbacks finish fills the queue to its limit and is closed.  So after a read that left messages
queued, the server stops reading from the socket; it reads again when the queue has drained, and
after ``LONGEST`` seconds at the latest, so that a close or a ping of the client is still seen
while a callback waits long.  A client that keeps sending meanwhile meets TCP flow control instead
of the pending limit, and the next read takes everything that arrived at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from connmix_tx.engine.outbound import pause_reading, resume_reading

#: The longest a connection goes unread because of its queue (seconds; at most twice that).
LONGEST = 0.25


class Reader(Protocol):
    """A client connection whose reading ``Backlog`` may pause."""

    transport: Any

    def may_read(self) -> bool:
        """Whether reading may resume now (not closing, not paused for another reason)."""


class Backlog:
    """The connections of one server not read because their callbacks are behind."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._paused: dict[Reader, float] = {}
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def __len__(self) -> int:
        return len(self._paused)

    def pause(self, reader: Reader) -> None:
        """``reader`` has messages queued after a read: stop reading until they ran."""
        if reader in self._paused:
            return
        pause_reading(reader.transport)
        self._paused[reader] = self.clock.seconds()
        if not self._loop.running:
            self._loop.start(LONGEST, now=False)

    def drained(self, reader: Reader) -> None:
        """``reader``'s queue is empty: read again."""
        if self._paused.pop(reader, None) is not None and reader.may_read():
            resume_reading(reader.transport)

    def forget(self, reader: Reader) -> None:
        """``reader`` closed."""
        self._paused.pop(reader, None)

    def stop(self) -> None:
        self._paused.clear()
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        due = self.clock.seconds() - LONGEST
        for reader in [r for r, since in self._paused.items() if since <= due]:
            self.drained(reader)
        if not self._paused and self._loop.running:
            self._loop.stop()
