"""A socket transport whose kernel send queue the test controls, and a TLS wrapper in front of it.

The outbound guards (``engine/outbound.py``) read the write queue that Twisted's
``FileDescriptor`` keeps (``dataBuffer`` from ``offset``, plus ``_tempDataBuffer`` /
``_tempDataLen``); Twisted's ``StringTransport`` keeps no such queue.  ``FakeSocketTransport`` is a
``StringTransport`` (every ``ITransport`` method, ``value()`` of all bytes written) that also keeps
that queue; ``take(n)`` plays the kernel accepting ``n`` bytes.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.testing import StringTransport


class FakeSocketTransport(StringTransport):
    """A ``StringTransport`` with ``FileDescriptor``'s write queue; ``take()`` plays the kernel."""

    def __init__(self, hostAddress: Any = None, peerAddress: Any = None) -> None:
        super().__init__(hostAddress, peerAddress)
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self.write(b"".join(seq))

    @property
    def queued(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def take(self, count: int) -> None:
        """The kernel accepts up to ``count`` bytes (as ``doWrite`` would, one buffer at a time)."""
        if len(self.dataBuffer) - self.offset < count:
            self.dataBuffer = self.dataBuffer[self.offset:] + b"".join(self._tempDataBuffer)
            self.offset, self._tempDataBuffer, self._tempDataLen = 0, [], 0
        self.offset += min(count, len(self.dataBuffer) - self.offset)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeTLS:
    """A TLS wrapper in front of a socket transport (``TLSMemoryBIOProtocol``'s shape).

    ``pending`` is plaintext written before the TLS handshake finished (``_appSendBuffer``).
    """

    def __init__(self, inner: Any, pending: Iterable[bytes] = (b"abc",)) -> None:
        self.transport = inner
        self._appSendBuffer = list(pending)
