"""Identifiers: snowflake client ids and xid-like node ids (docs/operations.md, "The cluster").

Both generators are plain classes with the time source injected, so tests drive them without
sleeping.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib
from typing import Callable

TWITTER_EPOCH_MS = 1288834974657
NODE_BITS = 10
SEQUENCE_BITS = 12
MAX_NODE_NUMBER = (1 << NODE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_CLIENT_ID = (1 << 63) - 1


class InvalidClientId(ValueError):
    """A client id given by a user is not a positive 63-bit integer."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Snowflake:
    """Cluster-unique, increasing 64-bit client ids for one engine.

    ``((ms - epoch) << 22) | (node_number << 12) | sequence``.  The sequence restarts every
    millisecond; after 4096 ids in one millisecond the generator moves on to the next
    millisecond; a clock that goes backwards is ignored until it catches up (the last
    millisecond keeps being used).
    """

    def __init__(self, node_number: int, now_ms: Callable[[], int] = _now_ms) -> None:
        if not 0 <= node_number <= MAX_NODE_NUMBER:
            raise ValueError(f"node number {node_number} outside 0-{MAX_NODE_NUMBER}")
        self.node_number = node_number
        self._now_ms = now_ms
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        """Return the next client id."""
        ms = max(self._now_ms(), self._last_ms)
        if ms == self._last_ms:
            self._sequence += 1
            if self._sequence > MAX_SEQUENCE:
                # 4096 ids in this millisecond: borrow the next one.  Time catches up.
                ms += 1
                self._sequence = 0
        else:
            self._sequence = 0
        self._last_ms = ms
        return ((ms - TWITTER_EPOCH_MS) << (NODE_BITS + SEQUENCE_BITS)) | (
            self.node_number << SEQUENCE_BITS
        ) | self._sequence


def node_number_of(client_id: int) -> int:
    """The number of the engine that owns ``client_id``."""
    return (client_id >> SEQUENCE_BITS) & MAX_NODE_NUMBER


def parse_client_id(value: object) -> int:
    """Accept a client id as a decimal string or an integer (docs/operations.md, "Client ids");
    raise InvalidClientId.

    Booleans, floats, zero, negatives, values above 2^63-1 and anything with non-digits are
    refused.
    """
    if isinstance(value, bool):
        raise InvalidClientId("invalid client id")
    if isinstance(value, int):
        number = value
    elif isinstance(value, bytes):  # bytes.isdigit is ASCII digits only
        if not value.isdigit() or len(value) > 19:
            raise InvalidClientId("invalid client id")
        number = int(value)
    elif isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            raise InvalidClientId("invalid client id")
        number = int(value)
    else:
        raise InvalidClientId("invalid client id")
    if not 0 < number <= MAX_CLIENT_ID:
        raise InvalidClientId("invalid client id")
    return number


_BASE32HEX = "0123456789abcdefghijklmnopqrstuv"
_xid_lock = threading.Lock()
_xid_counter = int.from_bytes(os.urandom(3), "big")


def _host_id() -> bytes:
    return struct.pack(">I", zlib.crc32(socket.gethostname().encode()))[1:]


def new_node_id(now: Callable[[], float] = time.time) -> str:
    """A new xid-like node id: 20 lower-case base32hex characters encoding 12 bytes.

    4-byte Unix time, 3-byte host id, 2-byte pid, 3-byte counter (as github.com/rs/xid).
    """
    global _xid_counter
    with _xid_lock:
        _xid_counter = (_xid_counter + 1) & 0xFFFFFF
        counter = _xid_counter
    raw = (
        struct.pack(">I", int(now()) & 0xFFFFFFFF)
        + _host_id()
        + struct.pack(">H", os.getpid() & 0xFFFF)
        + counter.to_bytes(3, "big")
    )
    bits = int.from_bytes(raw, "big") << 4  # 96 bits padded to 100 = 20 * 5
    return "".join(_BASE32HEX[(bits >> (95 - 5 * i)) & 31] for i in range(20))
