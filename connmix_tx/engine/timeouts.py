"""One idle-timeout wheel per server instead of one timer per connection.

Receiving data only stores a timestamp on the connection (no timer is touched).  The wheel ticks
every ``TICK`` seconds and looks only at the connections whose deadline fell due; one that received
something since is put back for its new deadline.  A connection is therefore closed no earlier
than ``timeout`` and no later than ``timeout + TICK`` after the last byte it sent
(docs/operations.md, "Per-connection limits").
"""

from __future__ import annotations

import math
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

TICK = 0.25


class Idle(Protocol):
    """A connection watched by the wheel."""

    last_received: float

    def idle_timeout(self) -> None:
        """Called once when nothing was received for the timeout."""


class IdleWheel:
    """Closes connections that stayed silent for ``timeout`` seconds (0 disables it)."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._slots: dict[int, set[Idle]] = {}
        self._call: IDelayedCall | None = None
        self._call_slot = 0
        self._watched: dict[Idle, int] = {}  # connection -> its slot

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, conn: Idle) -> None:
        """Start watching ``conn`` (its ``last_received`` must be set)."""
        if self.timeout <= 0:
            return
        self._put(conn, conn.last_received + self.timeout)

    def forget(self, conn: Idle) -> None:
        """Stop watching ``conn`` (it closed); nothing of it stays in the wheel."""
        slot = self._watched.pop(conn, None)
        if slot is not None:
            members = self._slots.get(slot)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self._slots[slot]

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._slots.clear()
        self._watched.clear()

    def _put(self, conn: Idle, deadline: float) -> None:
        slot = math.ceil(deadline / TICK)
        self._slots.setdefault(slot, set()).add(conn)
        self._watched[conn] = slot
        if self._call is not None and slot < self._call_slot:
            self._call.cancel()  # an earlier deadline (the timeout was lowered)
            self._call = None
        if self._call is None:
            self._schedule(slot)

    def _schedule(self, slot: int) -> None:
        self._call_slot = slot
        self._call = self.clock.callLater(max(0.0, slot * TICK - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._call = None
        now = self.clock.seconds()
        due = [s for s in self._slots if s * TICK <= now]
        expired: list[Idle] = []
        for slot in sorted(due):
            for conn in self._slots.pop(slot):
                if conn not in self._watched:
                    continue
                deadline = conn.last_received + self.timeout
                if deadline <= now:
                    del self._watched[conn]
                    expired.append(conn)
                else:
                    self._put(conn, deadline)
        if self._slots and self._call is None:
            self._schedule(min(self._slots))
        for conn in expired:
            conn.idle_timeout()

