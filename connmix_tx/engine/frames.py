"""Writing WebSocket messages straight to the transport (the hot path of every delivery).

Autobahn's ``sendMessage`` / ``sendPreparedMessage`` go through ``sendData``, which formats the
arguments of a debug log line on every call whether or not debug is on, plus several checks we
never need.  For the messages the engine writes — one unfragmented, unmasked server frame, no
per-message compression — the frame is a 2-10 byte header and the payload; ``write_message``
writes exactly that and falls back to Autobahn for everything else (compression negotiated,
not open).
"""

from __future__ import annotations

import struct
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol

from connmix_tx.engine.outbox import Outbox

_OPEN = WebSocketProtocol.STATE_OPEN
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


def frame(payload: bytes, binary: bool = False) -> bytes:
    """One complete unmasked server frame (FIN set) carrying ``payload``."""
    first = 0x82 if binary else 0x81
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return _HEADER_16(first, 126, size) + payload
    return _HEADER_64(first, 127, size) + payload


def direct(proto: Any) -> bool:
    """Whether ``proto`` can take pre-framed bytes (open, no per-message compression)."""
    return proto.state == _OPEN and getattr(proto, "_perMessageCompress", None) is None


def write_message(proto: Any, payload: bytes, binary: bool = False, outbox: Outbox | None = None) -> None:
    """``proto.sendMessage(payload, binary)``, written directly when possible (through
    ``outbox``, when given: sent at the end of the reactor turn)."""
    if direct(proto):
        _write(proto, frame(payload, binary), outbox)
    else:
        proto.sendMessage(payload, binary)


def write_frame(proto: Any, framed: bytes, payload: bytes, binary: bool, outbox: Outbox | None = None) -> None:
    """Write an already framed message (fan-out: framed once, written to many)."""
    if direct(proto):
        _write(proto, framed, outbox)
    else:
        proto.sendMessage(payload, binary)


def _write(proto: Any, framed: bytes, outbox: Outbox | None) -> None:
    if outbox is not None:
        outbox.write(proto.transport, framed, proto)
    else:
        proto.transport.write(framed)
