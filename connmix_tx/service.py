"""The service tree (SPEC 1.1, 2.4, 2.5): which children run for which role.

``ConnmixService`` is the root.  ``ROLE_PARTS`` maps a role to the parts it runs: the center
(registry + center API) and the engine (mesh point, engine API, center link, protocol servers).
Every listening port is a ``Listener`` built from an endpoint string (``ssl:`` for a listener
with a ``tls`` section, SPEC 10.1).  Fatal errors at run time (a protocol server port that cannot
be bound after registration, a registration that never succeeds) go through ``Fatal``: one line
on stderr, reactor stop, the exit code of SPEC 2.5.  Each part keeps its own Prometheus registry
(``connmix_tx.metrics``); SIGHUP reloads the configuration through ``connmix_tx.reload``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from connmix_tx import __version__
from connmix_tx.auth import AccessControl
from connmix_tx.center.api import center_site
from connmix_tx.center.pb import GuardedPBServerFactory, LoggingPortal, SecretChecker, registry_factory
from connmix_tx.center.registry import Registry
from connmix_tx.config import (
    AnyListener, Config, ConfigError, HostPort, load_config, worker_count, worker_mesh_ports,
)
from connmix_tx.engine.api_server import ApiWebSocketFactory, api_site
from connmix_tx.engine.center_link import CenterLink
from connmix_tx.engine.connections import ConnectionRegistry
from connmix_tx.engine.mesh_link import MeshPeers
from connmix_tx.engine.router import LocalOps
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.queue_redis import RedisQueueManager
from connmix_tx.engine.siblings import PusherNodeIds, SiblingQueues
from connmix_tx.engine.socket_server import SocketServerFactory
from connmix_tx.engine.websocket import ClientWebSocketFactory
from connmix_tx.ids import Snowflake, new_node_id
from connmix_tx.lua.http import HttpClient
from connmix_tx.lua.mixlib import MixLibrary
from connmix_tx.lua.redis import RedisPools
from connmix_tx.lua.runtime import Script, ScriptError
from connmix_tx.metrics import (
    CenterMetrics, EngineMetrics, MeshPointOps, MeteredApiDispatcher, MeteredHotReloader,
    MeteredMeshLink, MeteredMeshRealm, MeteredRouter, MetricsResource,
)
from connmix_tx.reuseport import ReusePortEndpoint
from connmix_tx.tls import TLSError, check_server_files, client_endpoint, server_options
from connmix_tx.worker_metrics import EngineMetricsResource, SiblingMetrics
from connmix_tx.workers import ParentWatch, WorkerPool, WorkerRole, report_ready, worker_argv

EXIT_CONFIG, EXIT_LISTEN = 2, 3
#: How long a clean stop waits for clients to finish their close handshakes (SPEC 2.5: < 5 s).
STOP_GRACE = 2.0

log = Logger(namespace="connmix.engine")


#: ``servers[].protocol`` -> the factory of its listener.  A factory takes
#: ``(server_config, script, connections, ids, clock, meter=None)`` and offers
#: ``open_protocols``, ``reconfigure(server_config)`` (SIGHUP) and ``shutdown()``.
SERVER_FACTORIES: dict[str, Callable[..., Any]] = {
    "websocket": ClientWebSocketFactory,
    "socket": SocketServerFactory,
}


class FatalError(Exception):
    """A start-up error that ends the process with ``code`` after one line ``connmix: <message>``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Fatal:
    """Ends the process from inside the running reactor with an exit code (SPEC 2.5)."""

    def __init__(self, reactor: Any, stderr: Any = None) -> None:
        self.reactor = reactor
        self.stderr = stderr
        self.code: int | None = None

    def __call__(self, code: int, message: str) -> None:
        if self.code is not None:
            return
        self.code = code
        write_fatal_line(message, self.stderr)
        log.error("{message}", message=message)
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now, code)
        if self.reactor.running:
            _stop_reactor(self.reactor)  # already stopping after a signal: the exit code still applies


def write_fatal_line(message: str, stream: Any = None) -> None:
    """Write the one line of a fatal error to stderr."""
    out = stream or sys.__stderr__
    out.write(f"connmix: {message}\n")
    out.flush()


def _stop_reactor(reactor: Any) -> None:
    """Stop the reactor unless it is stopping already (a fatal error, or a second signal)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _escape(text: str) -> str:
    """A value for an endpoint description (``\\``, ``:`` and ``=`` are syntax there)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def endpoint_string(listener: AnyListener) -> str:
    """The server endpoint description of a listener section: ``tcp:`` or, with ``tls``, ``ssl:``."""
    bind = _escape(listener.bind)
    tls = listener.tls
    if tls is None:
        return f"tcp:{listener.port}:interface={bind}"
    return (f"ssl:{listener.port}:interface={bind}:privateKey={_escape(tls.private_key)}"
            f":certKey={_escape(tls.certificate)}")


#: Listeners whose ``tls.caCertificates`` makes peers present a client certificate (SPEC 3.1).
CLIENT_CERTIFICATE_LISTENERS = ("center.registry", "engine.meshPoint")


def server_endpoint(reactor: Any, key: str, listener: AnyListener, reuse_port: bool = False) -> Any:
    """The endpoint a listener serves on; a bad certificate or key is a config error (exit 2).

    ``reuse_port``: the port is shared with the other workers of the engine (``SO_REUSEPORT``).
    """
    tls = listener.tls
    if reuse_port:
        options = None
        if tls is not None:
            try:
                check_server_files(tls)
                require = bool(tls.ca_certificates) and key in CLIENT_CERTIFICATE_LISTENERS
                options = server_options(tls, require_client_certificate=require)
            except TLSError as e:
                raise FatalError(EXIT_CONFIG, f"config {key}.tls: {e}") from None
        return ReusePortEndpoint(reactor, listener.port, listener.bind, context_factory=options)
    if tls is not None:
        try:
            check_server_files(tls)
            if tls.ca_certificates and key in CLIENT_CERTIFICATE_LISTENERS:
                # The ssl: description has no way to ask for client certificates.
                options = server_options(tls, require_client_certificate=True)
                return endpoints.SSL4ServerEndpoint(reactor, listener.port, options, interface=listener.bind)
        except TLSError as e:
            raise FatalError(EXIT_CONFIG, f"config {key}.tls: {e}") from None
    return endpoints.serverFromString(reactor, endpoint_string(listener))


class Listener(StreamServerEndpointService):
    """One listening port: opens synchronously, logs its start line, maps bind errors to exit 3."""

    def __init__(
        self, reactor: Any, key: str, listener: AnyListener, factory: Any, started: Callable[[str], None],
        reuse_port: bool = False,
    ) -> None:
        super().__init__(server_endpoint(reactor, key, listener, reuse_port), factory)
        self._raiseSynchronously = True
        self.key = key
        self.listener = listener
        self.started = started
        self.port: IListeningPort | None = None
        self._bound = listener.port

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise FatalError(EXIT_LISTEN, self._bind_error(e)) from None
        self._waitingForPort.addCallback(self._listening)

    def _bind_error(self, error: CannotListenError) -> str:
        reason = error.socketError
        text = getattr(reason, "strerror", None) or str(reason)
        return f"cannot listen on {self.listener.bind}:{self.listener.port} ({self.key}): {text.lower()}"

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self._bound = port.getHost().port
        scheme = "tls://" if self.listener.tls is not None else ""
        self.started(f"{scheme}{self.listener.bind}:{self._bound}")
        return port

    @property
    def actual_port(self) -> int:
        """The bound port (differs from the configured one for port 0); kept after stopping."""
        return self._bound


class CenterPart(service.MultiService):
    """Registry (PB) and center HTTP API."""

    def __init__(self, config: Config, reactor: Any, access: AccessControl) -> None:
        super().__init__()
        self.setName("center")
        cluster = config.cluster
        self.registry = Registry(reactor, cluster.heartbeat_timeout, cluster.number_reserve)
        self.metrics = CenterMetrics(self.registry)
        registry_log = Logger(namespace="connmix.registry")
        center_log = Logger(namespace="connmix.center")
        self.registry_listener = Listener(
            reactor, "center.registry", config.center.registry,
            registry_factory(self.registry, cluster.secret),
            lambda address: registry_log.info("start the registry server ({address})", address=address),
        )
        self.registry_listener.setServiceParent(self)
        self.api_listener = Listener(
            reactor, "center.apiServer", config.center.api_server,
            center_site(self.registry, access, config.center.api_server,
                        MetricsResource(self.metrics.registry)),
            lambda address: center_log.info("start the center api server ({address})", address=address),
        )
        self.api_listener.setServiceParent(self)
        self._interval = cluster.heartbeat_interval

    def startService(self) -> None:
        super().startService()
        self.registry.start(self._interval)

    def stopService(self) -> Any:
        self.registry.stop()
        return super().stopService()


def _queues(luavm: Any, reactor: Any, node_id: str, meter: Any) -> QueueManager:
    """The queue manager of the configured backend (docs/queues.md)."""
    queue = luavm.queue
    if queue.backend == "redis":
        redis = next(r for r in luavm.redis if r.name == queue.redis)
        return RedisQueueManager(reactor, redis, node_id, queue.topic_size, queue.prefix,
                                 queue.ack_timeout, meter=meter)
    return QueueManager(reactor, queue.topic_size, queue.max_topics, queue.ack_timeout, meter=meter)


class EnginePart(service.MultiService):
    """Mesh point, engine API, registration and, once registered, the protocol servers."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        fatal: Callable[[int, str], None],
        center_address: Callable[[], tuple[str, int]],
        in_process_center: bool,
        access: AccessControl,
        worker: WorkerRole | None = None,
    ) -> None:
        super().__init__()
        self.setName("engine")
        self.config = config
        self.reactor = reactor
        self.fatal = fatal
        self.node_id = new_node_id()
        #: Set when this process is one worker of a multi-process engine (docs/workers.md).
        self.worker = worker
        #: The engine id shared by the workers of one supervisor; a one-process engine is its own.
        self.engine_id = worker.engine if worker is not None else self.node_id
        shared = worker is not None  # protocol and API ports shared with the sibling workers
        engine = config.engine
        mesh_point = engine.mesh_point
        if worker is not None:
            port = worker_mesh_ports(config, worker.role, worker.index + 1)[-1]
            mesh_point = dataclasses.replace(mesh_point, port=port)
        self.metrics = EngineMetrics()
        self.connections = ConnectionRegistry()
        self.queues = _queues(engine.luavm, reactor, self.node_id, self.metrics)
        self.local = LocalOps(self.connections)
        self.peers = MeshPeers(self._mesh_link, self.node_id)
        self.router = MeteredRouter(self.metrics, 0, self.local, self.peers)
        self.nodes: list[dict[str, Any]] = []
        self.libraries: list[MixLibrary] = []
        # mix.http / mix.redis of every server share the engine's client and pools (lazy).
        self.http = HttpClient(reactor)
        self.redis = RedisPools(engine.luavm.redis, reactor)
        self.scripts = [self._script(i, server) for i, server in enumerate(engine.servers)]
        #: One hot reloader per server (SPEC 5.9); SIGHUP calls ``set_interval`` on them.
        self.reloaders = [
            MeteredHotReloader(self.metrics, script, reactor, server.byte_code_expires)
            for server, script in zip(engine.servers, self.scripts)
        ]
        self.protocol_listeners: list[Listener] = []
        self.client_factories: list[Any] = []
        #: Called once every protocol server listens (a worker tells its supervisor).
        self.on_ready: Callable[[], None] | None = None

        mesh_log = Logger(namespace="connmix.mesh")
        api_log = Logger(namespace="connmix.api")
        secret = config.cluster.secret
        mesh_ops = MeshPointOps(self.metrics, self.connections)
        mesh_realm = MeteredMeshRealm(mesh_ops, self.metrics)
        #: A worker's API consumes the queues of every worker (connmix_tx/engine/siblings.py).
        self.worker_queues: SiblingQueues | PusherNodeIds | None = None
        if worker is not None and self.queues.backend == "memory":
            self.worker_queues = mesh_ops.siblings = SiblingQueues(
                self.queues, self.node_id, reactor, self.peers.by_id.get)
        elif worker is not None:  # redis: the streams are shared; events name the pushing worker
            self.worker_queues = PusherNodeIds(self.queues, self.node_id)
        api_queues: Any = self.worker_queues or self.queues
        self.mesh_listener = Listener(
            reactor, "engine.meshPoint", mesh_point,
            GuardedPBServerFactory(LoggingPortal(mesh_realm, [SecretChecker(secret)], "mesh"), secret, "mesh"),
            lambda address: mesh_log.info("start the mesh node ({address})", address=address),
        )
        self.mesh_listener.setServiceParent(self)
        metrics_resource: Any = MetricsResource(self.metrics.registry)
        if worker is not None and worker.directory:
            # /metrics answers for every worker of the engine, whichever takes the scrape.
            self.sibling_metrics = SiblingMetrics(reactor, worker.directory, worker.index, self.metrics.registry)
            self.sibling_metrics.setServiceParent(self)
            metrics_resource = EngineMetricsResource(self.sibling_metrics.gather)
        self.api_factory = ApiWebSocketFactory(
            engine.api_server, MeteredApiDispatcher(self.metrics, self.router, api_queues, access),
            api_queues, self.node_id, metrics=self.metrics, clock=reactor,
        )
        self.api_listener = Listener(
            reactor, "engine.apiServer", engine.api_server,
            api_site(self.api_factory, metrics_resource),
            lambda address: api_log.info("start the api server ({address})", address=address),
            reuse_port=shared,
        )
        self.api_listener.setServiceParent(self)
        self.metrics.watch(self)

        def center_endpoint() -> tuple[Any, str]:
            host, port = center_address()
            tls = config.center.registry.tls
            if tls is not None:
                endpoint = client_endpoint(reactor, host, port, tls, engine.mesh_point.tls)
                return endpoint, f"{host}:{port}"
            text = f"tcp:{host.replace(':', chr(92) + ':')}:{port}"
            return endpoints.clientFromString(reactor, text), f"{host}:{port}"

        self.center_link = CenterLink(
            center_endpoint,
            self.node_id,
            {"version": __version__, "advertise_host": engine.advertise_host,
             "api_server_port": 0, "mesh_point_port": 0,
             "engine": self.engine_id, "worker": worker.index if worker is not None else 0},
            config.cluster.secret,
            reactor,
            config.cluster.heartbeat_interval,
            stats=lambda: {"clients": len(self.connections), "channels": len(self.connections.channels)},
            on_nodes=self._nodes,
            fatal=fatal,
            register_timeout=None if in_process_center else config.cluster.register_timeout,
        )
        self.center_link.registered.addCallback(self._registered)

    def _mesh_link(self, node: dict[str, Any]) -> MeteredMeshLink:
        """The link to another engine's mesh point; TLS when this engine's meshPoint has ``tls``."""
        cluster, tls = self.config.cluster, self.config.engine.mesh_point.tls
        endpoint = None
        if tls is not None:
            target = HostPort.parse(str(node["mesh_point"]))
            endpoint = client_endpoint(self.reactor, target.host, target.port, tls, tls, timeout=5)
        return MeteredMeshLink(
            self.metrics, self.reactor, node, self.node_id, cluster.secret,
            cluster.mesh_timeout, cluster.heartbeat_interval, cluster.heartbeat_timeout, endpoint=endpoint,
        )

    def _script(self, index: int, server: Any) -> Script:
        if server.protocol not in SERVER_FACTORIES:
            raise FatalError(
                EXIT_CONFIG,
                f"config engine.servers[{index}].protocol: {server.protocol} servers are not available",
            )
        library = MixLibrary(
            self.connections, self.router, self.queues, self.reactor, dict(server.options),
            http=self.http, redis=self.redis,
        )
        script = Script(
            server.entry, server.protocol, library.functions(), self.reactor,
            max_memory_mib=self.config.engine.luavm.max_memory,
            max_instructions=self.config.engine.luavm.max_instructions,
            extensions=library.extensions(),
        )
        library.bind(script)
        self.libraries.append(library)
        try:
            script.load()
        except ScriptError as e:
            raise FatalError(EXIT_CONFIG, f"config engine.servers[{index}].entry: {e}") from None
        return script

    def startService(self) -> None:
        # The listeners were opened in privilegedStartService; now the center knows our ports.
        self.center_link.info.update(
            api_server_port=self.api_listener.actual_port,
            mesh_point_port=self.mesh_listener.actual_port,
        )
        super().startService()
        self.center_link.startService()
        for reloader in self.reloaders:
            reloader.start()
        self.queues.start()  # the redis backend connects

    def _nodes(self, nodes: list) -> None:
        """A node list from the center: keep one mesh link per other live engine."""
        self.nodes = nodes
        self.peers.update(nodes)
        if isinstance(self.worker_queues, SiblingQueues):
            self.worker_queues.update(self.siblings())
        elif self.worker_queues is not None:
            self.worker_queues.update(nodes)

    def siblings(self) -> list[dict[str, Any]]:
        """The other workers of this engine in the center's latest node list (same ``engine``).

        Their mesh links are ``self.peers``' links to their node ids.
        """
        return [node for node in self.nodes
                if node.get("engine") == self.engine_id and node.get("id") != self.node_id]

    def _registered(self, number: int) -> None:
        self.router.node_number = number
        ids = Snowflake(number)
        server_log = Logger(namespace="connmix.server")
        for index, (server, script) in enumerate(zip(self.config.engine.servers, self.scripts)):
            meter = self.metrics.server(server.protocol, script.chunk_name(server.entry))
            factory = SERVER_FACTORIES[server.protocol](
                server, script, self.connections, ids, self.reactor, meter=meter
            )
            try:
                listener = Listener(
                    self.reactor, f"engine.servers[{index}]", server, factory,
                    lambda address, entry=server.entry: server_log.info(
                        "start the protocol server {entry} ({address})", entry=entry, address=address
                    ),
                    reuse_port=self.worker is not None,
                )
                listener.privilegedStartService()
            except FatalError as e:
                self.fatal(e.code, e.message)
                return
            listener.startService()
            self.protocol_listeners.append(listener)
            self.client_factories.append(factory)
        if self.on_ready is not None:
            self.on_ready()

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop accepting, close clients with 1001 and wait (bounded) for them, unregister."""
        for reloader in self.reloaders:
            reloader.stop()
        yield gatherResults([maybeDeferred(listener.stopService) for listener in self.protocol_listeners])
        for factory in self.client_factories:
            factory.shutdown()
        self.api_factory.shutdown()
        yield self._drained(STOP_GRACE)
        (self.worker_queues or self.queues).stop()
        self.peers.stop()
        self.redis.close()
        yield self.http.close()
        yield maybeDeferred(self.center_link.stopService)
        yield super().stopService()

    def _drained(self, timeout: float) -> Deferred:
        """Fires when every client and API connection has gone, or after ``timeout`` seconds."""
        done: Deferred = Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            left = sum(len(f.open_protocols) for f in [*self.client_factories, self.api_factory])
            if left == 0 or self.reactor.seconds() >= deadline:
                done.callback(left)
            else:
                self.reactor.callLater(0.05, check)

        check()
        return done


class ConnmixService(service.MultiService):
    """The root service: the parts of the role, in start order.

    With more than one worker process (``processes``, the ``-p`` value, else ``engine.workers``)
    an engine role runs as a supervisor: the center part in dev / single, then a ``WorkerPool``
    in place of the engine part.  A process started as a worker (``worker``) runs the engine part
    only, on the ports it shares with its siblings (docs/workers.md).
    """

    def __init__(
        self,
        config: Config,
        role: str,
        reactor: Any,
        fatal: Callable[[int, str], None],
        processes: int | None = None,
        worker: WorkerRole | None = None,
        relay: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.role = role
        self.center: CenterPart | None = None
        self.engine: EnginePart | None = None
        #: The supervisor's worker processes (None in a one-process engine and in a worker).
        self.workers: WorkerPool | None = None
        self.worker = worker
        self.processes = processes
        self.worker_count = worker_count(config.engine.workers if processes is None else processes)
        #: One access control for every API listener of the process (hot on SIGHUP).
        self.access = AccessControl(config.access)
        #: Set by the twistd plugin: what SIGHUP runs (``connmix_tx.reload.Reloader``).
        self.reloader: Any = None
        if worker is not None:
            _add_worker(self, config, reactor, fatal)
        elif self.worker_count > 1 and role != "center":
            if role != "engine":
                _add_center(self, config, reactor, fatal)
            _add_workers(self, config, reactor, fatal, relay or _print_line)
        else:
            for part in ROLE_PARTS[role]:
                part(self, config, reactor, fatal)

    def stopService(self) -> Any:
        """Stop the tree; a supervisor stops its workers first, so they unregister from a live center."""
        workers = self.workers
        if workers is None or not workers.running:
            return super().stopService()
        stopping = maybeDeferred(workers.stopService)
        return stopping.addBoth(lambda _: super(ConnmixService, self).stopService())

    def reload(self) -> None:
        """SIGHUP: reload this process; a supervisor validates the file first, then forwards it."""
        if self.workers is not None:
            try:
                load_config(self.config.source, role=self.role, workers=self.processes)
            except ConfigError as e:
                Logger(namespace="connmix.config").error("config reload failed: {error}", error=str(e))
                return
        if self.reloader is not None:
            self.reloader.reload()
        if self.workers is not None:
            self.workers.forward("HUP")

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except FatalError as e:
            write_fatal_line(e.message)
            raise SystemExit(e.code) from None

    def install_signal_handlers(self, reactor: Any) -> None:
        """SIGTERM / SIGINT stop cleanly with exit 0 (SPEC 2.5, 2.6); SIGHUP reloads (SPEC 3.4).

        twistd would otherwise re-raise the signal after the reactor stops, so the process
        would end "killed by SIGTERM" instead of exiting 0.  Called once the reactor runs,
        because the reactor installs its own handlers at start.  A reload runs on the reactor
        thread, one after the other: a SIGHUP during a reload is applied after it.
        """

        def stop(signum: int, frame: Any) -> None:
            log.info("received {signal}, stopping", signal=signal.Signals(signum).name)
            reactor.callFromThread(_stop_reactor, reactor)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
        if self.worker is not None:
            # Ctrl-C in a terminal reaches the whole process group: the supervisor alone decides
            # (it sends SIGTERM), so a worker does not end before its supervisor knows it should.
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        if self.reloader is not None or self.workers is not None:
            signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(self.reload))


def _add_center(root: ConnmixService, config: Config, reactor: Any, fatal: Callable) -> None:
    root.center = CenterPart(config, reactor, root.access)
    root.center.setServiceParent(root)


def _add_engine(root: ConnmixService, config: Config, reactor: Any, fatal: Callable) -> None:
    center = root.center
    if center is not None:
        # dev / single: dial the in-process registry over loopback (SPEC 2.4).
        def address() -> tuple[str, int]:
            return "127.0.0.1", center.registry_listener.actual_port
    else:
        target = config.engine.center_registry

        def address() -> tuple[str, int]:
            return target.host, target.port

    root.engine = EnginePart(
        config, reactor, fatal, address, in_process_center=center is not None, access=root.access
    )
    root.engine.setServiceParent(root)


def _add_worker(root: ConnmixService, config: Config, reactor: Any, fatal: Callable) -> None:
    """Worker ``i`` of a multi-process engine: the engine part, and a watch on its supervisor."""
    worker = root.worker
    assert worker is not None
    target = worker.center or (config.engine.center_registry.host, config.engine.center_registry.port)
    root.engine = EnginePart(
        config, reactor, fatal, lambda: target, in_process_center=False, access=root.access, worker=worker
    )
    root.engine.on_ready = report_ready
    root.engine.setServiceParent(root)

    def supervisor_gone() -> None:
        # Nobody else will remove the engine's run directory: the last worker out does.
        if worker.directory:
            reactor.addSystemEventTrigger("after", "shutdown", _remove_empty_directory, worker.directory)
        reactor.callLater(0, _stop_reactor, reactor)

    ParentWatch(reactor, supervisor_gone).setServiceParent(root)


def _remove_empty_directory(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # a sibling still has its socket there; it will try too


def _add_workers(root: ConnmixService, config: Config, reactor: Any, fatal: Callable,
                 relay: Callable[[str], None]) -> None:
    """The supervisor's worker processes; in dev / single they dial the in-process registry."""
    engine_id = new_node_id()
    center = root.center
    source = config.source or ""

    def argv(index: int) -> list[str]:
        address = ("127.0.0.1", center.registry_listener.actual_port) if center is not None else None
        return worker_argv(root.role, source, engine_id, index, address, root.workers.directory,
                           root.worker_count)

    root.workers = WorkerPool(root.worker_count, argv, reactor, fatal, relay)
    root.workers.engine_id = engine_id
    root.workers.setServiceParent(root)


def _print_line(line: str) -> None:
    print(line, flush=True)


#: Role -> the parts it runs, in start order (STYLE 4: a table, not if-chains).
ROLE_PARTS: dict[str, tuple[Callable[..., None], ...]] = {
    "center": (_add_center,),
    "engine": (_add_engine,),
    "dev": (_add_center, _add_engine),
    "single": (_add_center, _add_engine),
}
