"""A fake of the protocol object that carries one client connection (``ClientTransport``).

The engine's plain classes (the router, the API dispatcher, the mesh point, the ``mix`` library)
reach a client only through ``ClientConnection.transport``; ``FakeClientTransport`` stands in for the
WebSocket or socket protocol there and records what it was asked to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connmix_tx.meter import NULL_METER, ServerMeter

if TYPE_CHECKING:
    from connmix_tx.engine.connections import ClientTransport


class FakeClientTransport:
    """Records what the engine asked a client connection's protocol object to do.

    ``error`` (None by default) is the answer to every ``send_message`` / ``deliver``: a transport
    that refuses (``"slow consumer"``, ``"closed"``...) records nothing.  ``clear_error`` is the
    answer to ``clear_buffer`` (None: supported, as on socket servers).
    """

    meter: ServerMeter = NULL_METER

    def __init__(self, error: str | None = None, clear_error: str | None = None) -> None:
        self.error = error
        self.clear_error = clear_error
        #: ``(data, binary)`` of every accepted ``send_message`` (the script's own ``conn:send``).
        self.sent: list[tuple[bytes, bool]] = []
        #: ``(data, binary)`` of every accepted ``deliver`` (API, mesh, publish).
        self.delivered: list[tuple[bytes, bool]] = []
        #: The ``shared`` dict of every ``deliver`` call, accepted or not.
        self.shared: list[dict[str, Any]] = []
        self.closes = 0
        self.clears = 0

    def send_message(self, data: bytes, binary: bool) -> str | None:
        if self.error is None:
            self.sent.append((data, binary))
        return self.error

    def deliver(self, data: bytes, binary: bool, shared: dict[str, Any]) -> str | None:
        self.shared.append(shared)
        if self.error is None:
            self.delivered.append((data, binary))
        return self.error

    def close_connection(self) -> None:
        self.closes += 1

    def clear_buffer(self) -> str | None:
        self.clears += 1
        return self.clear_error

    @property
    def closed(self) -> bool:
        """Whether ``close_connection`` was called at least once."""
        return self.closes > 0

    @property
    def payloads(self) -> list[bytes]:
        """The data of every accepted delivery, without the binary flag."""
        return [data for data, _ in self.delivered]


if TYPE_CHECKING:  # the type checker proves the fake fits the interface
    _fits: ClientTransport = FakeClientTransport()
