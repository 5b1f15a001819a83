"""Prometheus metrics (SPEC 7.5 engine, SPEC 9 center) and ``GET /metrics``.

Every part of a service tree (the center, the engine) owns one ``CollectorRegistry`` — never
prometheus_client's global one — so several trees in one process (tests) do not collide, and in
dev mode the center API and the engine API each show their own names.

Counters are incremented where the events happen, through children bound once (per server, per
topic, per method...) so a hot path pays one ``inc()``.  Gauges (clients, channels, queue length
and consumers, API connections, mesh peers, the center's engine list) are read from the live
objects at scrape time by a collector, so nothing is updated per event for them.

The queues report through ``EngineMetrics`` itself (a ``QueueMeter``).  The instrumented
variants of other engine classes (``MeteredRouter``,
``MeteredApiDispatcher``, ``MeteredMeshLink``, ``MeteredMeshRealm``, ``MeteredHotReloader``) keep
the counting out of the plain classes; the service tree uses them, unit tests of the plain
classes do not pay for them.
"""

from __future__ import annotations

import platform
from time import perf_counter
from typing import Any, Iterable

import twisted
from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.spread import pb
from twisted.web.resource import Resource
from twisted.web.server import Request

from connmix_tx import __version__
from connmix_tx.engine.api import ApiDispatcher, ApiError, ApiSession, Dialect
from connmix_tx.engine.mesh import MeshPeerAvatar, MeshRealm
from connmix_tx.engine.mesh_link import MeshLink
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.router import LocalOps, Router
from connmix_tx.lua.reload import HotReloader
from connmix_tx.web import METHOD_NOT_ALLOWED_BODY, json_response

#: The exposition format of SPEC 7.5.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: ``protocol`` label of forwarded sends: the target's protocol is known only to its engine.
FORWARD_PROTOCOL = "mesh"


class ReactorValue(values.MutexValue):
    """A metric value touched only from the reactor thread (updates and scrapes alike), so it
    needs no lock: prometheus_client's default takes a mutex on every ``inc()``, which showed as
    a quarter of a mesh point's time under load (docs/performance.md)."""

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def get(self) -> float:
        return self._value


if values.ValueClass is values.MutexValue:  # not in prometheus_client's multiprocess mode
    values.ValueClass = ReactorValue


def new_registry() -> CollectorRegistry:
    """A registry of its own (not prometheus_client's process-wide ``REGISTRY``)."""
    return CollectorRegistry(auto_describe=True)


def _build_info(registry: CollectorRegistry) -> None:
    from connmix_tx.tap import lua_version

    info = Gauge("connmix_build_info", "Build information (always 1)",
                 ["version", "python", "twisted", "lua"], registry=registry)
    info.labels(__version__, platform.python_version(), twisted.__version__, lua_version()).set(1)


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text of one registry (behind the site's AccessGuard)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET")
            return json_response(request, 405, METHOD_NOT_ALLOWED_BODY)
        request.setHeader(b"content-type", CONTENT_TYPE)
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- engine


class ServerMeter:
    """The children of one protocol server, bound once (its ``protocol`` and ``entry``)."""

    __slots__ = ("read", "sent", "errors", "local_send", "slow", "_lua_errors", "_entry", "_metrics")

    def __init__(self, metrics: EngineMetrics, protocol: str, entry: str) -> None:
        self.read = metrics.read_messages.labels(protocol)
        self.sent = metrics.send_messages.labels(protocol)
        self.errors = metrics.send_errors.labels(protocol)
        self.local_send = metrics.send_duration.labels(protocol, "local")
        self.slow = metrics.slow_client
        self._metrics = metrics
        self._entry = entry
        self._lua_errors: dict[str, Any] = {}

    def lua_error(self, callback: str, message: Any = None) -> None:
        """One callback error of this server's script (SPEC 5.10)."""
        child = self._lua_errors.get(callback)
        if child is None:
            child = self._lua_errors[callback] = self._metrics.lua_errors.labels(self._entry, callback)
        child.inc()


class EngineMetrics:
    """The engine names of SPEC 7.5 in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else new_registry()
        self.read_messages = Counter(
            "connmix_engine_servers_read_messages", "Messages received from clients (decoded)",
            ["protocol"], registry=r)
        self.send_messages = Counter(
            "connmix_engine_servers_send_messages", "Messages sent to clients", ["protocol"], registry=r)
        self.send_errors = Counter(
            "connmix_engine_servers_send_errors", "Failed sends", ["protocol"], registry=r)
        self.send_duration = Summary(
            "connmix_engine_servers_send_duration_seconds",
            "Time from a send call to the write (local) or to the mesh reply (forward)",
            ["protocol", "scenario"], registry=r)
        self.queue_push = Counter(
            "connmix_engine_queue_push", "Queue pushes", ["topic", "result"], registry=r)
        self.queue_delivered = Counter(
            "connmix_engine_queue_delivered", "Events written to consumers", ["topic"], registry=r)
        self.api_requests = Counter(
            "connmix_engine_api_requests", "API requests (WebSocket and HTTP); code 0 = ok",
            ["method", "code"], registry=r)
        self.slow_disconnects = Counter(
            "connmix_engine_slow_disconnects", "Slow-consumer closes", ["kind"], registry=r)
        self.mesh_batches = Counter(
            "connmix_engine_mesh_batches", "Mesh PB batches", ["direction"], registry=r)
        self.mesh_messages = Counter(
            "connmix_engine_mesh_messages", "Mesh operations", ["direction", "op"], registry=r)
        self.lua_errors = Counter(
            "connmix_engine_lua_errors", "Lua callback errors", ["entry", "callback"], registry=r)
        self.lua_reloads = Counter(
            "connmix_engine_lua_reloads", "Lua hot reloads", ["entry", "result"], registry=r)
        self.queue_acks = Counter(
            "connmix_engine_queue_acks", "Queue messages acknowledged", ["topic"], registry=r)
        self.queue_redeliveries = Counter(
            "connmix_engine_queue_redeliveries", "Unacknowledged queue messages put back for redelivery",
            ["topic"], registry=r)
        _build_info(r)
        self.slow_client = self.slow_disconnects.labels("client")
        self.slow_api = self.slow_disconnects.labels("api")
        self.batches_out = self.mesh_batches.labels("out")
        self.batches_in = self.mesh_batches.labels("in")
        self.forward_send = self.send_duration.labels(FORWARD_PROTOCOL, "forward")
        self._cache: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child

    def server(self, protocol: str, entry: str) -> ServerMeter:
        """The children of one protocol server."""
        return ServerMeter(self, protocol, entry)

    def pushed(self, topic: str, result: str) -> None:
        """One push: ``result`` ok, full or error."""
        self._child(self.queue_push, topic, result).inc()

    def acked(self, topic: str, count: int) -> None:
        """``count`` queue messages of ``topic`` acknowledged (a ``QueueMeter`` method)."""
        self._child(self.queue_acks, topic).inc(count)

    def redelivered(self, topic: str, count: int) -> None:
        """``count`` queue messages of ``topic`` put back for redelivery (a ``QueueMeter`` method)."""
        self._child(self.queue_redeliveries, topic).inc(count)

    def delivered(self, topic: str) -> Any:
        """The delivered-events child of ``topic`` (bound once per topic)."""
        return self._child(self.queue_delivered, topic)

    def api_request(self, method: str, code: int) -> None:
        """One API request; ``method`` is a known long name, ``unknown`` or ``""``."""
        self._child(self.api_requests, method, str(code)).inc()

    def mesh_op(self, direction: str, op: str) -> Any:
        """The child of mesh operations ``op`` in ``direction`` (``in`` / ``out``)."""
        return self._child(self.mesh_messages, direction, op)

    def lua_reload(self, entry: str, ok: bool) -> None:
        """One hot reload of ``entry`` (called by the Lua hot reloader)."""
        self._child(self.lua_reloads, entry, "ok" if ok else "failed").inc()

    def watch(self, engine: Any) -> None:
        """Collect the gauges of ``engine`` (an ``EnginePart``) at scrape time."""
        self.registry.register(EngineGauges(engine))


class EngineGauges:
    """Gauges read from a running engine when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # names only known per scrape; nothing to check against at registration

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        clients = GaugeMetricFamily("connmix_engine_servers_clients", "Open client connections",
                                    labels=["protocol", "port"])
        for listener, factory in zip(engine.protocol_listeners, engine.client_factories):
            clients.add_metric([factory.config.protocol, str(listener.actual_port)],
                               len(factory.open_protocols))
        yield clients
        yield GaugeMetricFamily("connmix_engine_channels", "Distinct channels with a local subscriber",
                                value=len(engine.connections.channels))
        length = GaugeMetricFamily("connmix_engine_queue_length", "Waiting messages", labels=["topic"])
        consumers = GaugeMetricFamily("connmix_engine_queue_consumers", "Consumers", labels=["topic"])
        unacked = GaugeMetricFamily("connmix_engine_queue_unacked", "Delivered, unacknowledged messages",
                                    labels=["topic"])
        for name, topic in list(engine.queues.topics.items()):
            length.add_metric([name], topic.waiting)
            consumers.add_metric([name], len(topic.consumers))
            unacked.add_metric([name], len(topic.unacked))
        yield length
        yield consumers
        yield unacked
        up = getattr(engine.queues, "up", None)
        if up is not None:
            yield GaugeMetricFamily("connmix_engine_queue_backend_up",
                                    "1 while the queue backend (redis) answers, else 0", value=int(up))
        yield GaugeMetricFamily("connmix_engine_api_connections", "Open API WebSockets",
                                value=len(engine.api_factory.open_protocols))
        yield GaugeMetricFamily("connmix_engine_mesh_peers", "Connected mesh links", value=engine.peers.up)


class MeteredRouter(Router):
    """``Router`` that times sends: to the write (local) or to the mesh reply (forward)."""

    def __init__(self, metrics: EngineMetrics, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def send(self, client_id: int, data: bytes, binary: bool) -> Any:
        start = perf_counter()
        result = super().send(client_id, data, binary)
        if isinstance(result, Deferred):
            return result.addBoth(self._forwarded, start)
        conn = self.local.connections.by_id.get(client_id)
        meter = getattr(getattr(conn, "transport", None), "meter", None)
        if meter is not None:
            meter.local_send.observe(perf_counter() - start)
        return result

    def _forwarded(self, result: Any, start: float) -> Any:
        self.metrics.forward_send.observe(perf_counter() - start)
        return result

    def forward(self, link: Any, ops: list[tuple], done: Any) -> None:
        """The sends of one API read: each is timed to the link's answer for all of them."""
        start = perf_counter()
        sends = sum(1 for op in ops if op[0] == "send")

        def answered(results: list) -> Any:
            if sends:
                elapsed = perf_counter() - start
                observe = self.metrics.forward_send.observe
                for _ in range(sends):
                    observe(elapsed)
            return done(results)

        super().forward(link, ops, answered)


def MeteredQueueManager(metrics: "EngineMetrics", *args: Any, **kwargs: Any) -> QueueManager:
    """A memory ``QueueManager`` reporting to ``metrics`` (kept for older callers; new code
    passes ``meter=metrics`` itself)."""
    return QueueManager(*args, meter=metrics, **kwargs)


class MeteredApiDispatcher(ApiDispatcher):
    """``ApiDispatcher`` counting requests by method and error code (0 = ok).

    The ``method`` label is the long name of a known method, ``unknown`` for any other name, and
    ``""`` for a request refused before its method was read (bad JSON, no method key...).
    ``mesh.send`` / ``conn.call`` over the WebSocket take the dispatcher's fast path
    (``handle_many``), which calls ``count`` itself.
    """

    def __init__(self, metrics: EngineMetrics, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        self._counted = False

    def count(self, name: str, code: int, dialect: Dialect | None = None) -> None:
        """Count one request called ``name`` (as written in ``dialect``) that ended with ``code``."""
        method = (dialect.method(name) if dialect is not None else name) or "unknown"
        self.metrics.api_request(method, code)

    def handle(self, session: ApiSession, raw: bytes) -> Any:
        self._counted = False
        reply = super().handle(session, raw)
        if not self._counted:
            self.metrics.api_request("", _reply_code(reply))
        return reply

    def call(self, session: ApiSession, dialect: Dialect, name: str, params: Any) -> Any:
        self._counted = True
        try:
            result = super().call(session, dialect, name, params)
        except ApiError as e:
            self.count(name, e.code, dialect)
            raise
        if isinstance(result, Deferred):
            return result.addCallbacks(self._answered, self._refused,
                                       callbackArgs=(name, dialect), errbackArgs=(name, dialect))
        self.count(name, 0, dialect)
        return result

    def _answered(self, result: Any, name: str, dialect: Dialect) -> Any:
        self.count(name, 0, dialect)
        return result

    def _refused(self, failure: Any, name: str, dialect: Dialect) -> Any:
        self.count(name, getattr(failure.value, "code", -32603), dialect)
        return failure


def _reply_code(reply: Any) -> int:
    """The error code of a reply written before any method ran (always an error)."""
    import json

    try:
        error = json.loads(reply)["error"]
        return int(error["code"])
    except Exception:
        return -32603


class MeteredMeshLink(MeshLink):
    """``MeshLink`` counting operations and batches sent."""

    def __init__(self, metrics: EngineMetrics, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def _enqueue(self, kind: str, op: list, group: Any, index: int) -> None:
        self.metrics.mesh_op("out", kind).inc()
        super()._enqueue(kind, op, group, index)

    def _flush(self) -> None:
        before = self._in_flight
        super()._flush()
        # A batch's reply arrives from the network, never inside _flush: the growth is the count.
        if self._in_flight > before:
            self.metrics.batches_out.inc(self._in_flight - before)


class MeshPointOps(LocalOps):
    """``LocalOps`` of the mesh point: counts the operations other engines send here."""

    def __init__(self, metrics: EngineMetrics, *args: Any) -> None:
        super().__init__(*args)
        self._send = metrics.mesh_op("in", "send")
        self._publish = metrics.mesh_op("in", "publish")
        self._call = metrics.mesh_op("in", "call")

    def send(self, client_id: int, data: bytes, binary: bool) -> str | None:
        self._send.inc()
        return super().send(client_id, data, binary)

    def publish(self, channel: str, data: bytes, binary: bool) -> tuple[int, int]:
        self._publish.inc()
        return super().publish(channel, data, binary)

    def call(self, client_id: int, func: str, args: list[Any]) -> str | None:
        self._call.inc()
        return super().call(client_id, func, args)


class _MeteredAvatar(MeshPeerAvatar):
    def __init__(self, local: LocalOps, peer_node_id: str, batches: Any) -> None:
        super().__init__(local, peer_node_id)
        self._batches = batches

    def perspective_batch(self, blob: bytes) -> bytes:
        self._batches.inc()
        return super().perspective_batch(blob)


class MeteredMeshRealm(MeshRealm):
    """``MeshRealm`` whose avatars count the batches they receive."""

    def __init__(self, local: LocalOps, metrics: EngineMetrics) -> None:
        super().__init__(local)
        self.metrics = metrics

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("PB only")
        peer = avatar_id.decode() if isinstance(avatar_id, bytes) else str(avatar_id)
        return pb.IPerspective, _MeteredAvatar(self.local, peer, self.metrics.batches_in), lambda: None


class MeteredHotReloader(HotReloader):
    """``HotReloader`` counting reloads of its entry: ``ok`` or ``failed`` (SPEC 7.5)."""

    def __init__(self, metrics: EngineMetrics, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def check(self) -> bool:
        refused = self._failed
        reloaded = super().check()
        if reloaded:
            self.metrics.lua_reload(self.entry, ok=True)
        elif self._failed is not None and self._failed != refused:
            self.metrics.lua_reload(self.entry, ok=False)  # a new broken version
        return reloaded


# --------------------------------------------------------------------------- center


class CenterMetrics:
    """The center names of SPEC 9, read from the registry at scrape time."""

    def __init__(self, registry_of_engines: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.engines = registry_of_engines
        self.registry.register(self)
        _build_info(self.registry)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        nodes = self.engines.nodes()
        yield GaugeMetricFamily("connmix_center_registry_engine_nodes", "Live engines", value=len(nodes))
        yield GaugeMetricFamily("connmix_center_registry_clients",
                                "Sum of the engines' last reported clients",
                                value=sum(n.clients for n in nodes))
        yield GaugeMetricFamily("connmix_center_registry_channels_total",
                                "Sum of the engines' last reported channel counts",
                                value=sum(n.channels for n in nodes))
