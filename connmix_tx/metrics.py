"""The engine's and the center's metric names, and ``GET /metrics`` (docs/operations.md).

``EngineMeter`` implements every protocol of the meter seam (``connmix_tx.meter``) with plain
integers (``connmix_tx.tally``); the service tree hands it to the plain classes it builds, and
registers the gauges it reads from live objects at scrape time.  ``CenterMeter`` reads the
registry's gauges.  ``MetricsResource`` answers with the summed snapshots of a *source*: this
process alone, or every worker of an engine (the source then answers with a Deferred).

This room imports nothing from ``connmix_tx.engine`` or ``connmix_tx.lua``.
"""

from __future__ import annotations

import platform
from typing import Any, Callable, Union

import twisted
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from connmix_tx import __version__
from connmix_tx.tally import INFO, Count, Family, GaugeReader, Meters, Snapshot, Timing, exposition
from connmix_tx.later import now_or_later
from connmix_tx.web import method_not_allowed

log = Logger(namespace="connmix.api")

#: The Prometheus text exposition format.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: ``protocol`` label of forwarded sends: the target's protocol is known only to its engine.
FORWARD_PROTOCOL = "mesh"

#: What ``/metrics`` renders: snapshots now, or later (an engine of several workers).
SnapshotSource = Callable[[], Union[list[Snapshot], Deferred]]


def build_info(meters: Meters, lua: str) -> None:
    """``connmix_build_info``: always 1, the versions in its labels."""
    labels = (__version__, platform.python_version(), twisted.__version__, lua)
    meters.gauge("connmix_build_info", "Build information (always 1)", lambda: [(labels, 1)],
                 ("version", "python", "twisted", "lua"), kind=INFO)


class ServerCounts:
    """The counters of one protocol server (``connmix_tx.meter.ServerMeter``)."""

    __slots__ = ("read", "sent", "errors", "slow", "local_send", "_lua_errors", "_entry")

    def __init__(self, meter: EngineMeter, protocol: str, entry: str) -> None:
        self.read: Count = meter.read_messages.child(protocol)
        self.sent: Count = meter.send_messages.child(protocol)
        self.errors: Count = meter.send_errors.child(protocol)
        self.local_send: Timing = meter.send_duration.child(protocol, "local")
        self.slow: Count = meter.slow_client
        self._lua_errors = meter.lua_errors
        self._entry = entry

    def lua_error(self, callback: str, message: object = None) -> None:
        self._lua_errors.child(self._entry, callback).inc()


class EngineMeter:
    """Every engine metric, counted in plain integers; implements each meter protocol."""

    def __init__(self, lua: str = "") -> None:
        self.meters = m = Meters()
        self.read_messages = m.counter("connmix_engine_servers_read_messages",
                                       "Messages received from clients (decoded)", ("protocol",))
        self.send_messages = m.counter("connmix_engine_servers_send_messages",
                                       "Messages sent to clients", ("protocol",))
        self.send_errors = m.counter("connmix_engine_servers_send_errors", "Failed sends", ("protocol",))
        self.send_duration = m.summary(
            "connmix_engine_servers_send_duration_seconds",
            "Time from a send call to the write (local) or to the mesh reply (forward)",
            ("protocol", "scenario"))
        self.queue_push = m.counter("connmix_engine_queue_push", "Queue pushes", ("topic", "result"))
        self.queue_delivered = m.counter("connmix_engine_queue_delivered",
                                         "Events written to consumers", ("topic",))
        self.queue_acks = m.counter("connmix_engine_queue_acks",
                                    "Messages acknowledged by manual consumers", ("topic",))
        self.queue_redeliveries = m.counter("connmix_engine_queue_redeliveries",
                                            "Messages put back for another delivery", ("topic",))
        self.api_requests = m.counter("connmix_engine_api_requests",
                                      "API requests (WebSocket and HTTP); code 0 = ok", ("method", "code"))
        self.slow_disconnects = m.counter("connmix_engine_slow_disconnects", "Slow-consumer closes", ("kind",))
        self.mesh_batches = m.counter("connmix_engine_mesh_batches", "Mesh PB batches", ("direction",))
        self.mesh_messages = m.counter("connmix_engine_mesh_messages", "Mesh operations", ("direction", "op"))
        self.lua_errors = m.counter("connmix_engine_lua_errors", "Lua callback errors", ("entry", "callback"))
        self.lua_reloads = m.counter("connmix_engine_lua_reloads", "Lua hot reloads", ("entry", "result"))
        if lua:
            build_info(m, lua)
        self.slow_client: Count = self.slow_disconnects.child("client")
        self.slow_api: Count = self.slow_disconnects.child("api")
        self.forward_send: Timing = self.send_duration.child(FORWARD_PROTOCOL, "forward")

    # connmix_tx.meter protocols ---------------------------------------------------------------

    def server(self, protocol: str, entry: str) -> ServerCounts:
        return ServerCounts(self, protocol, entry)

    def pushed(self, topic: str, result: str) -> None:
        self.queue_push.child(topic, result).inc()

    def delivered(self, topic: str) -> Count:
        child: Count = self.queue_delivered.child(topic)
        return child

    def acked(self, topic: str, count: int) -> None:
        self.queue_acks.child(topic).inc(count)

    def redelivered(self, topic: str, count: int) -> None:
        self.queue_redeliveries.child(topic).inc(count)

    def request(self, method: str, code: int) -> None:
        self.api_requests.child(method, str(code)).inc()

    def op(self, direction: str, op: str) -> Count:
        child: Count = self.mesh_messages.child(direction, op)
        return child

    def batch(self, direction: str) -> Count:
        child: Count = self.mesh_batches.child(direction)
        return child

    def reloaded(self, entry: str, ok: bool) -> None:
        self.lua_reloads.child(entry, "ok" if ok else "failed").inc()

    # Gauges and scrapes -----------------------------------------------------------------------

    def gauge(self, name: str, help: str, read: GaugeReader, labels: tuple[str, ...] = ()) -> None:
        """A gauge read from live objects when scraped (registered by the service tree)."""
        self.meters.gauge(name, help, read, labels)

    def snapshot(self) -> Snapshot:
        return self.meters.snapshot()


def counter_value(family: Family, *labels: str) -> float:
    """The value of one counter child (0 when it never counted): for tests and tools."""
    child = family.children.get(labels)
    return 0 if child is None else child.value


class CenterMeter:
    """The center's gauges, read from the registry of engines when scraped."""

    def __init__(self, engines: Any, lua: str = "") -> None:
        self.meters = m = Meters()
        m.gauge("connmix_center_registry_engine_nodes", "Live engines", lambda: [((), len(engines.nodes()))])
        m.gauge("connmix_center_registry_clients", "Sum of the engines' last reported clients",
                lambda: [((), sum(n.clients for n in engines.nodes()))])
        m.gauge("connmix_center_registry_channels_total",
                "Sum of the engines' last reported channel counts",
                lambda: [((), sum(n.channels for n in engines.nodes()))])
        if lua:
            build_info(m, lua)

    def snapshot(self) -> Snapshot:
        return self.meters.snapshot()


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text of the snapshots ``source`` returns (behind the
    site's access guard)."""

    isLeaf = True

    def __init__(self, source: SnapshotSource) -> None:
        super().__init__()
        self.source = source

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, b"GET")
        request.setHeader(b"content-type", CONTENT_TYPE)
        return now_or_later(self.source(), exposition, lambda later: _answer_later(request, later))


def _answer_later(request: Request, snapshots: Deferred) -> object:
    """Write the text of ``snapshots`` when the workers answered (a worker's ``/metrics``)."""
    def failed(failure: Failure) -> None:
        log.failure("metrics scrape failed", failure)
        _finish(request, b"")

    snapshots.addCallbacks(lambda s: _finish(request, exposition(s)), failed)
    return NOT_DONE_YET


def _finish(request: Request, body: bytes) -> None:
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()


def own(*meters: EngineMeter | CenterMeter) -> SnapshotSource:
    """The source of one process: the snapshots of ``meters``, read at each scrape."""
    def source() -> list[Snapshot]:
        return [m.snapshot() for m in meters]
    return source

