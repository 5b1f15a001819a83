"""``GET /metrics`` for the whole engine when it runs as several worker processes (docs/workers.md).

The API port is shared by the workers, so a scrape lands on any one of them.  Every worker serves
the snapshot of its own meter (``connmix_tx.tally``, msgpack) on a Unix socket ``w{i}.metrics``
in the engine's private run directory (created by the supervisor, mode 0700); the worker that
takes the scrape reads its siblings' snapshots there and answers with the sum
(``connmix_tx.tally.merge``: counters, summaries and gauges summed per series, ``connmix_build_info``
kept at 1).  A sibling that does not answer within ``timeout`` (restarting, stopping) is left out
of that scrape.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import msgpack
from twisted.application import service
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IListeningPort

from connmix_tx.reactors import IReactor, IStreamTransport
from connmix_tx.tally import Snapshot

SOCKET_SUFFIX = ".metrics"
FETCH_TIMEOUT = 2.0


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"w{index}{SOCKET_SUFFIX}")


class _Expose(protocol.Protocol):
    """Writes the worker's snapshot and closes."""

    transport: IStreamTransport

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def connectionMade(self) -> None:
        self.transport.write(msgpack.packb(self.snapshot(), use_bin_type=True))
        self.transport.loseConnection()


class _ExposeFactory(protocol.Factory):
    """Serves ``snapshot()`` to every connection."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def buildProtocol(self, addr: IAddress | None) -> _Expose:
        return _Expose(self.snapshot)


class _Read(protocol.Protocol):
    """Reads until the other side closes; ``done`` fires with the bytes."""

    transport: IStreamTransport

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))


class SiblingMetrics(service.Service):
    """Serves this worker's snapshot on ``w{index}.metrics`` and reads the siblings' sockets."""

    def __init__(self, reactor: IReactor, directory: str, index: int, snapshot: Callable[[], Snapshot],
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.reactor = reactor
        self.directory = directory
        self.index = index
        self.snapshot = snapshot
        self.timeout = timeout
        self._port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        path = socket_path(self.directory, self.index)
        try:
            os.unlink(path)  # left by this worker's previous process
        except FileNotFoundError:
            pass
        self._port = self.reactor.listenUNIX(path, _ExposeFactory(self.snapshot), mode=0o600)

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None

    def sibling_paths(self) -> list[str]:
        """The other workers' sockets present in the run directory."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return []
        own = os.path.basename(socket_path(self.directory, self.index))
        return [os.path.join(self.directory, n) for n in names if n.endswith(SOCKET_SUFFIX) and n != own]

    def fetch(self, path: str) -> Deferred:
        """The snapshot a sibling serves at ``path``; fires with None when it does not answer."""
        endpoint = endpoints.UNIXClientEndpoint(self.reactor, path, timeout=self.timeout)
        reader = _Read()
        connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: reader))

        def connected(proto: _Read) -> Deferred:
            timer = self.reactor.callLater(self.timeout, proto.transport.abortConnection)

            def stop_timer(result: object) -> object:
                if timer.active():
                    timer.cancel()
                return result

            return proto.done.addBoth(stop_timer)

        result = connecting.addCallback(connected)
        return result.addCallbacks(_unpack, lambda failure: None)

    def gather(self) -> Deferred:
        """Fires with the snapshots of this worker and of every sibling that answered."""
        own = self.snapshot()
        fetches = [self.fetch(path) for path in self.sibling_paths()]
        return DeferredList(fetches).addCallback(
            lambda results: [own] + [snapshot for ok, snapshot in results if ok and snapshot])


def _unpack(data: bytes) -> Snapshot | None:
    try:
        snapshot = msgpack.unpackb(data, raw=False)
    except Exception:
        return None  # cut short (the sibling stopped while writing)
    return snapshot if isinstance(snapshot, list) else None
