"""WebSocket settings both servers share: the client-facing ``protocol: websocket`` server
(connmix_tx/engine/websocket.py) and the engine API (connmix_tx/engine/api_server.py).

Close codes, the write-timeout reason, the opening-handshake timeout and the Autobahn factory
options; nothing here imports the Lua side, so the API server does not need it.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "CLOSE_GOING_AWAY", "CLOSE_NORMAL", "CLOSE_POLICY", "CLOSE_SLOW", "CLOSE_TOO_BIG", "HANDSHAKE_TIMEOUT",
    "WRITE_TIMEOUT", "ExactTimer", "accept_deflate", "end_message", "websocket_options",
]

CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY = 1000, 1001, 1008
CLOSE_TOO_BIG = 1009
#: The peer does not read what it is sent (docs/robustness.md, "Clients").
CLOSE_SLOW = 4008
WRITE_TIMEOUT = "write timeout"
#: The whole opening handshake, ``on_handshake`` included, in seconds.
HANDSHAKE_TIMEOUT = 10


def accept_deflate(offers: list) -> PerMessageDeflateOfferAccept | None:
    """Accept the first permessage-deflate offer (the ``compression: true`` servers)."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None



def websocket_options(max_message_size: int, compression: bool) -> dict[str, Any]:
    """The Autobahn factory settings of both WebSocket servers (docs/configuration.md)."""
    return dict(
        maxFramePayloadSize=max_message_size,
        maxMessagePayloadSize=max_message_size,
        openHandshakeTimeout=HANDSHAKE_TIMEOUT,
        closeHandshakeTimeout=1,
        utf8validateIncoming=True,
        failByDrop=False,
        webStatus=False,
        trustXForwardedFor=0,
        perMessageCompressionAccept=accept_deflate if compression else (lambda offers: None),
    )


class _Call:
    """What ``ExactTimer.call_later`` returns: cancellable once, and after it ran."""

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ExactTimer:
    """Autobahn's protocol timers (opening handshake, close handshake, connection drop) at the
    time they were asked for.

    Autobahn's factories schedule them on a txaio batched timer, which truncates ``now + delay``
    to a whole second before rounding it into its buckets: the 1 s close-handshake timeout fired
    anywhere from 0 to 1 s after the close frame, so a client that answered the close in 200 ms
    could be dropped (1006, ``on_close`` told "connection lost"), and the 10 s opening handshake
    ran out after 9 to 10 s.  The factories replace ``_batched_timer`` with this one.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        return _Call(self.clock.callLater(delay, func, *args, **kwargs))


def end_message(proto: Any) -> None:
    """Autobahn's ``onMessageEnd`` without its observable "message" signal.

    Autobahn hands the reassembled message to ``onMessage`` and then also fires a "message"
    event for ``proto.on("message", ...)`` listeners: a Deferred and two callbacks per message,
    about 6 % of the engine's time on inbound messages.  Nothing in the engine listens to it; both
    WebSocket protocols call this from their ``onMessageEnd``.
    """
    if not proto.failedByMe:
        proto._onMessage(b"".join(proto.message_data), proto.message_is_binary)
    proto.message_data = None
