"""The meter seam: what the engine's plain classes count, as ``typing.Protocol`` s.

A plain class that counts something takes a meter typed by one of these protocols and defaults to
``NULL_METER``, which counts nothing.  ``connmix_tx.metrics.EngineMeter`` implements them all with
plain integers exported when ``/metrics`` is scraped.  This module imports nothing from the engine
and nothing from prometheus_client, so every room can depend on it.

Hot paths hold on to a ``Count`` (bound once per server, topic or op) and call ``inc()``: one
attribute add, no lock, no label lookup.
"""

from __future__ import annotations

from typing import Protocol


class Count(Protocol):
    """One counter child (its labels already bound)."""

    def inc(self, amount: int = 1) -> None:
        """Add ``amount``."""


class Timer(Protocol):
    """One summary child: observations of a duration in seconds."""

    def observe(self, seconds: float) -> None:
        """Record one duration."""


class ServerMeter(Protocol):
    """What the connections of one protocol server count (bound to its protocol and entry)."""

    # Read-only properties, so an implementation may hold any Count / Timer (a protocol
    # attribute would be mutable, hence invariant).
    @property
    def read(self) -> Count: ...
    @property
    def sent(self) -> Count: ...
    @property
    def errors(self) -> Count: ...
    @property
    def slow(self) -> Count: ...
    @property
    def local_send(self) -> Timer: ...

    def lua_error(self, callback: str, message: object = None) -> None:
        """One error raised by ``callback`` of this server's script (``message``: its text)."""


class ServersMeter(Protocol):
    """Hands out the meter of each protocol server."""

    def server(self, protocol: str, entry: str) -> ServerMeter:
        """The meter of the server running ``entry`` with ``protocol``."""


class QueueMeter(Protocol):
    """Queue pushes and deliveries, by topic."""

    def pushed(self, topic: str, result: str) -> None:
        """One push; ``result`` is ``ok``, ``full`` or ``error``."""

    def delivered(self, topic: str) -> Count:
        """The delivered-events counter of ``topic``."""

    def acked(self, topic: str, count: int) -> None:
        """``count`` messages of ``topic`` were acknowledged by a manual consumer."""

    def redelivered(self, topic: str, count: int) -> None:
        """``count`` messages of ``topic`` went back to the head of the line."""


class ApiMeter(Protocol):
    """API requests and slow API connections."""

    @property
    def slow_api(self) -> Count: ...

    def request(self, method: str, code: int) -> None:
        """One request of ``method`` (a long name, ``unknown`` or ``""``) ending with ``code``."""


class ApiServerMeter(ApiMeter, QueueMeter, Protocol):
    """The API server counts slow connections and the queue events it writes."""


class MeshMeter(Protocol):
    """Mesh operations and batches, both directions, and forwarded send times."""

    @property
    def forward_send(self) -> Timer: ...

    def op(self, direction: str, op: str) -> Count:
        """The counter of operations ``op`` going ``in`` or ``out``."""

    def batch(self, direction: str) -> Count:
        """The counter of batches going ``in`` or ``out``."""


class ReloadMeter(Protocol):
    """Lua hot reloads."""

    def reloaded(self, entry: str, ok: bool) -> None:
        """One reload of ``entry``: applied (``ok``) or refused."""


class _NullCount:
    __slots__ = ()

    def inc(self, amount: int = 1) -> None:
        pass

    def observe(self, seconds: float) -> None:
        pass


NULL_COUNT = _NullCount()


class NullMeter:
    """Every meter protocol at once, counting nothing: the default of every plain class."""

    read = sent = errors = slow = slow_api = NULL_COUNT
    local_send = forward_send = NULL_COUNT

    def server(self, protocol: str, entry: str) -> NullMeter:
        return self

    def lua_error(self, callback: str, message: object = None) -> None:
        pass

    def pushed(self, topic: str, result: str) -> None:
        pass

    def delivered(self, topic: str) -> _NullCount:
        return NULL_COUNT

    def acked(self, topic: str, count: int) -> None:
        pass

    def redelivered(self, topic: str, count: int) -> None:
        pass

    def request(self, method: str, code: int) -> None:
        pass

    def op(self, direction: str, op: str) -> _NullCount:
        return NULL_COUNT

    def batch(self, direction: str) -> _NullCount:
        return NULL_COUNT

    def reloaded(self, entry: str, ok: bool) -> None:
        pass


NULL_METER = NullMeter()
