"""``GET /metrics`` for the whole engine when it runs as several worker processes (docs/workers.md).

The API port is shared by the workers, so a scrape lands on any one of them.  Every worker serves
the Prometheus text of its own registry on a Unix socket ``w{i}.metrics`` in the engine's private
run directory (created by the supervisor, mode 0700); the worker that takes the scrape reads its
siblings' texts there and answers with the sum.  Counters, histograms, summaries and gauges are
summed per series (same name and labels); ``*_created`` samples take the earliest value and
``*_info`` gauges the largest, so ``connmix_build_info`` stays 1.  A sibling that does not answer
within ``timeout`` (restarting, stopping) is left out of that scrape.

``merge_expositions`` is the plain part; ``SiblingMetrics`` (a service) and
``EngineMetricsResource`` (the ``/metrics`` resource) are the Twisted sides.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application import service
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from connmix_tx.metrics import CONTENT_TYPE
from connmix_tx.web import METHOD_NOT_ALLOWED_BODY, json_response

log = Logger(namespace="connmix.metrics")

SOCKET_SUFFIX = ".metrics"
FETCH_TIMEOUT = 2.0


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"w{index}{SOCKET_SUFFIX}")


def _combine(name: str, old: float, new: float) -> float:
    if name.endswith("_created"):
        return min(old, new)
    if name.endswith("_info"):
        return max(old, new)
    return old + new


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One Prometheus text exposition summing every series of ``texts`` (see the module doc)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            series = values.setdefault(known.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = float(sample.value)
                series[key] = _combine(family.name, series[key], value) if key in series else value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


class _Expose(protocol.Protocol):
    """Writes the registry's text and closes."""

    def connectionMade(self) -> None:
        self.transport.write(generate_latest(self.factory.registry))
        self.transport.loseConnection()


class _Read(protocol.Protocol):
    """Reads until the other side closes; ``done`` fires with the bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))


class SiblingMetrics(service.Service):
    """Serves this worker's registry on ``w{index}.metrics`` and reads the siblings' sockets."""

    def __init__(self, reactor: Any, directory: str, index: int, registry: CollectorRegistry,
                 timeout: float = FETCH_TIMEOUT) -> None:
        self.reactor = reactor
        self.directory = directory
        self.index = index
        self.registry = registry
        self.timeout = timeout
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        path = socket_path(self.directory, self.index)
        try:
            os.unlink(path)  # left by this worker's previous process
        except FileNotFoundError:
            pass
        factory = protocol.Factory.forProtocol(_Expose)
        factory.registry = self.registry  # type: ignore[attr-defined]
        self._port = self.reactor.listenUNIX(path, factory, mode=0o600)

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
        """The text a sibling serves at ``path``; fires with None when it does not answer."""
        endpoint = endpoints.UNIXClientEndpoint(self.reactor, path, timeout=self.timeout)
        reader = _Read()
        connecting = endpoint.connect(protocol.Factory.forProtocol(lambda: reader))

        def connected(proto: _Read) -> Deferred:
            timer = self.reactor.callLater(self.timeout, proto.transport.abortConnection)
            return proto.done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

        result = connecting.addCallback(connected)
        return result.addCallbacks(lambda data: data.decode("utf-8", "replace"), lambda failure: None)

    def gather(self) -> Deferred:
        """Fires with the texts of this worker and of every sibling that answered."""
        own = generate_latest(self.registry).decode()
        fetches = [self.fetch(path) for path in self.sibling_paths()]
        return DeferredList(fetches).addCallback(
            lambda results: [own] + [text for ok, text in results if ok and text])


class EngineMetricsResource(Resource):
    """``GET /metrics`` of a worker: the sum over every worker of the engine."""

    isLeaf = True

    def __init__(self, gather: Callable[[], Deferred]) -> None:
        super().__init__()
        self.gather = gather

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET")
            return json_response(request, 405, METHOD_NOT_ALLOWED_BODY)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def answer(texts: list[str]) -> None:
            if finished:
                return
            request.setHeader(b"content-type", CONTENT_TYPE)
            request.write(merge_expositions(texts))
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("metrics of the engine's workers", failure)
            if not finished:
                request.setResponseCode(500)
                request.finish()

        self.gather().addCallbacks(answer, failed)
        return NOT_DONE_YET
