"""The engine part: everything one engine process runs, as named child services.

Children, in start order (``outline`` in ``connmix_tx.tree`` prints them):

* ``engine.meshPoint`` and ``engine.apiServer`` (``Listener``; a worker also has ``metrics``, the
  engine-wide ``/metrics`` of its siblings, docs/workers.md);
* ``servers[i]`` (``ProtocolServer``): script, hot reloader, factory and listener of each
  ``engine.servers[]`` entry;
* ``center-link`` (``CenterLink``): registration and heartbeats; once registered the protocol
  servers start serving;
* ``queues`` (the queue backend), ``mesh-peers`` (one mesh link per other engine) and
  ``lua-clients`` (the HTTP client and Redis pools of ``mix.http`` / ``mix.redis``).

A clean stop is ordered: stop accepting (hot reloaders, protocol listeners), close clients with
1001 and the API WebSockets, wait at most ``STOP_GRACE`` seconds for them, stop the queues, the
mesh links and the Lua clients, unregister (``center-link``), then close the remaining listeners.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.logger import Logger

from connmix_tx import __version__
from connmix_tx.auth import AccessControl
from connmix_tx.config import Config, HostPort, worker_mesh_ports
from connmix_tx.engine.api import ApiDispatcher
from connmix_tx.engine.api_server import ApiWebSocketFactory, api_site
from connmix_tx.engine.center_link import CenterLink
from connmix_tx.engine.connections import ConnectionRegistry
from connmix_tx.engine.mesh import MeshRealm
from connmix_tx.engine.mesh_link import MeshLink, MeshPeers
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.queue_redis import RedisQueueManager
from connmix_tx.engine.router import LocalOps, Router
from connmix_tx.engine.siblings import PusherNodeIds, SiblingQueues
from connmix_tx.errors import FatalError
from connmix_tx.ids import Snowflake, new_node_id
from connmix_tx.listeners import Listener
from connmix_tx.lua.http import HttpClient
from connmix_tx.lua.redis import RedisPools
from connmix_tx.lua.runtime import lua_version
from connmix_tx.metrics import EngineMeter, MetricsResource, own
from connmix_tx.parts.servers import ProtocolServer, ServerFactory
from connmix_tx.pb import GuardedPBServerFactory, LoggingPortal, SecretChecker
from connmix_tx.reactors import IReactor
from connmix_tx.tls import client_endpoint
from connmix_tx.worker_metrics import SiblingMetrics
from connmix_tx.workers import WorkerRole

#: How long a clean stop waits for clients to finish their close handshakes (the whole stop: < 5 s).
STOP_GRACE = 2.0

mesh_log = Logger(namespace="connmix.mesh")
api_log = Logger(namespace="connmix.api")


def _queues(config: Config, reactor: IReactor, node_id: str, meter: Any) -> QueueManager:
    """The queue manager of the configured backend (docs/queues.md)."""
    luavm = config.engine.luavm
    queue = luavm.queue
    if queue.backend == "redis":
        redis = next(r for r in luavm.redis if r.name == queue.redis)
        return RedisQueueManager(reactor, redis, node_id, queue.topic_size, queue.prefix,
                                 queue.ack_timeout, meter=meter)
    return QueueManager(reactor, queue.topic_size, queue.max_topics, queue.ack_timeout, meter=meter)


class QueueService(service.Service):
    """The queue backend: started and stopped with the tree, sizes hot on SIGHUP."""

    def __init__(self, queues: QueueManager) -> None:
        self.setName("queues")
        self.queues = queues

    def startService(self) -> None:
        super().startService()
        self.queues.start()  # the redis backend connects

    def stopService(self) -> None:
        super().stopService()
        self.queues.stop()

    def reconfigure(self, old: Config, new: Config) -> None:
        """``engine.luavm.queue``: sizes and ack timeout; nothing waiting is dropped."""
        queue = new.engine.luavm.queue
        self.queues.configure(queue.topic_size, queue.max_topics, queue.ack_timeout)


class MeshPeersService(service.Service):
    """The mesh links to the other engines of the center's node list; closed on stop."""

    def __init__(self, config: Config, reactor: IReactor, node_id: str, metrics: EngineMeter) -> None:
        self.setName("mesh-peers")
        self.config = config
        self.reactor = reactor
        self.node_id = node_id
        self.metrics = metrics
        self.peers = MeshPeers(self._link, node_id)

    def _link(self, node: dict[str, Any]) -> MeshLink:
        """The link to another engine's mesh point; TLS when this engine's meshPoint has ``tls``."""
        cluster, tls = self.config.cluster, self.config.engine.mesh_point.tls
        endpoint = None
        if tls is not None:
            target = HostPort.parse(str(node["mesh_point"]))
            endpoint = client_endpoint(self.reactor, target.host, target.port, tls, tls, timeout=5)
        return MeshLink(
            self.reactor, node, self.node_id, cluster.secret,
            cluster.mesh_timeout, cluster.heartbeat_interval, cluster.heartbeat_timeout, endpoint=endpoint,
            meter=self.metrics,
        )

    def stopService(self) -> None:
        super().stopService()
        self.peers.stop()


class LuaClients(service.Service):
    """The HTTP client and Redis pools every script of the engine shares (lazy); closed on stop."""

    def __init__(self, config: Config, reactor: IReactor) -> None:
        self.setName("lua-clients")
        self.http = HttpClient(reactor)
        self.redis = RedisPools(config.engine.luavm.redis, reactor)

    def stopService(self) -> Deferred:
        super().stopService()
        self.redis.close()
        return self.http.close()


def watch_engine(meter: EngineMeter, engine: EnginePart) -> None:
    """The engine's gauges, read from its live objects when ``/metrics`` is scraped."""

    def clients() -> list[tuple[tuple[str, ...], float]]:
        return [((factory.config.protocol, str(listener.actual_port)), len(factory.open_protocols))
                for listener, factory in zip(engine.protocol_listeners, engine.client_factories)]

    def topics(read: Callable[[Any], int]) -> Callable[[], list[tuple[tuple[str, ...], float]]]:
        return lambda: [((name,), read(topic)) for name, topic in list(engine.queues.topics.items())]

    meter.gauge("connmix_engine_servers_clients", "Open client connections", clients, ("protocol", "port"))
    meter.gauge("connmix_engine_channels", "Distinct channels with a local subscriber",
                lambda: [((), len(engine.connections.channels))])
    meter.gauge("connmix_engine_queue_length", "Waiting messages", topics(lambda t: t.waiting), ("topic",))
    meter.gauge("connmix_engine_queue_consumers", "Consumers", topics(lambda t: len(t.consumers)), ("topic",))
    meter.gauge("connmix_engine_queue_unacked", "Delivered, unacknowledged messages",
                topics(lambda t: len(t.unacked)), ("topic",))
    queues = engine.queues
    if isinstance(queues, RedisQueueManager):
        meter.gauge("connmix_engine_queue_backend_up", "1 while the queue backend (redis) answers, else 0",
                    lambda: [((), int(queues.up))])
    meter.gauge("connmix_engine_api_connections", "Open API WebSockets",
                lambda: [((), len(engine.api_factory.open_protocols))])
    meter.gauge("connmix_engine_mesh_peers", "Connected mesh links", lambda: [((), engine.peers.up)])


class EnginePart(service.MultiService):
    """Mesh point, engine API, registration and, once registered, the protocol servers."""

    def __init__(
        self,
        config: Config,
        reactor: IReactor,
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
        engine = config.engine
        mesh_point = engine.mesh_point
        if worker is not None:
            port = worker_mesh_ports(config, worker.role, worker.index + 1)[-1]
            mesh_point = dataclasses.replace(mesh_point, port=port)
        self.metrics = EngineMeter(lua_version())
        self.connections = ConnectionRegistry()
        self.queues = _queues(config, reactor, self.node_id, self.metrics)
        self.local = LocalOps(self.connections)
        self.mesh_peers = MeshPeersService(config, reactor, self.node_id, self.metrics)
        self.peers = self.mesh_peers.peers
        #: A worker's API consumes the queues of every worker (connmix_tx/engine/siblings.py):
        #: on the memory backend through its siblings, on redis the streams are shared already.
        self.worker_queues: SiblingQueues | PusherNodeIds | None = None
        if worker is not None and self.queues.backend == "memory":
            self.worker_queues = self.local.siblings = SiblingQueues(
                self.queues, self.node_id, reactor, self.peers.by_id.get)
        elif worker is not None:
            self.worker_queues = PusherNodeIds(self.queues, self.node_id)
        api_queues: Any = self.worker_queues or self.queues
        self.queue_service = QueueService(api_queues)
        self.router = Router(0, self.local, self.peers, meter=self.metrics)
        self.nodes: list[dict[str, Any]] = []
        self.lua_clients = LuaClients(config, reactor)
        self.http, self.redis = self.lua_clients.http, self.lua_clients.redis
        #: One ``ProtocolServer`` per ``engine.servers[]`` entry (scripts load here: exit 2).
        self.servers = [ProtocolServer(i, config, reactor, self) for i in range(len(engine.servers))]
        #: Called once every protocol server listens (a worker tells its supervisor).
        self.on_ready: Callable[[], None] | None = None

        secret = config.cluster.secret
        mesh_realm = MeshRealm(self.local, self.metrics, reactor)
        self.mesh_listener = Listener(
            reactor, "engine.meshPoint", mesh_point,
            GuardedPBServerFactory(LoggingPortal(mesh_realm, [SecretChecker(secret)], "mesh"), secret, "mesh"),
            lambda address: mesh_log.info("start the mesh node ({address})", address=address),
        )
        self.mesh_listener.setServiceParent(self)
        metrics_resource = MetricsResource(own(self.metrics))
        if worker is not None and worker.directory:
            # /metrics answers for every worker of the engine, whichever takes the scrape.
            self.sibling_metrics = SiblingMetrics(reactor, worker.directory, worker.index, self.metrics.snapshot)
            self.sibling_metrics.setName("metrics")
            self.sibling_metrics.setServiceParent(self)
            metrics_resource = MetricsResource(self.sibling_metrics.gather)
        self.api_factory = ApiWebSocketFactory(
            engine.api_server, ApiDispatcher(self.router, api_queues, access, meter=self.metrics),
            api_queues, self.node_id, meter=self.metrics, clock=reactor,
        )
        self.api_listener = Listener(
            reactor, "engine.apiServer", engine.api_server,
            api_site(self.api_factory, metrics_resource),
            lambda address: api_log.info("start the api server ({address})", address=address),
            reuse_port=worker is not None,  # shared with the sibling workers
        )
        self.api_listener.setServiceParent(self)
        watch_engine(self.metrics, self)
        for server in self.servers:  # running before the center link: registration serves them
            server.setServiceParent(self)
        self.center_link = self._center_link(center_address, in_process_center)
        self.center_link.setName("center-link")
        self.center_link.setServiceParent(self)
        self.center_link.registered.addCallback(self._registered)
        for child in (self.queue_service, self.mesh_peers, self.lua_clients):
            child.setServiceParent(self)

    def _center_link(self, center_address: Callable[[], tuple[str, int]], in_process_center: bool) -> CenterLink:
        config, reactor, worker = self.config, self.reactor, self.worker

        def center_endpoint() -> tuple[Any, str]:
            host, port = center_address()
            tls = config.center.registry.tls
            if tls is not None:
                endpoint = client_endpoint(reactor, host, port, tls, config.engine.mesh_point.tls)
                return endpoint, f"{host}:{port}"
            text = f"tcp:{host.replace(':', chr(92) + ':')}:{port}"
            return endpoints.clientFromString(reactor, text), f"{host}:{port}"

        return CenterLink(
            center_endpoint,
            self.node_id,
            {"version": __version__, "advertise_host": config.engine.advertise_host,
             "api_server_port": 0, "mesh_point_port": 0,
             "engine": self.engine_id, "worker": worker.index if worker is not None else 0},
            config.cluster.secret,
            reactor,
            config.cluster.heartbeat_interval,
            stats=lambda: {"clients": len(self.connections), "channels": len(self.connections.channels)},
            on_nodes=self._nodes,
            fatal=self.fatal,
            register_timeout=None if in_process_center else config.cluster.register_timeout,
        )

    # What tests, metrics and the console read --------------------------------------------------

    @property
    def scripts(self) -> list[Any]:
        """The Lua script of each protocol server."""
        return [server.script for server in self.servers]

    @property
    def libraries(self) -> list[Any]:
        """The ``mix`` library of each protocol server."""
        return [server.library for server in self.servers]

    @property
    def reloaders(self) -> list[Any]:
        """The hot reloader of each protocol server."""
        return [server.hot_reloader for server in self.servers]

    @reloaders.setter
    def reloaders(self, reloaders: list[Any]) -> None:
        """Replace the hot reloaders (tests inject fakes)."""
        for server, reloader in zip(self.servers, reloaders):
            server.hot_reloader = reloader

    @property
    def protocol_listeners(self) -> list[Listener]:
        """The listeners of the protocol servers that serve (after registration)."""
        return [server.listener for server in self.servers if server.listener is not None]

    @property
    def client_factories(self) -> list[ServerFactory]:
        """The client factories of the protocol servers that serve."""
        return [server.factory for server in self.servers
                if server.listener is not None and server.factory is not None]

    # Running ----------------------------------------------------------------------------------

    def startService(self) -> None:
        # The listeners were opened in privilegedStartService; now the center knows our ports.
        self.center_link.info.update(
            api_server_port=self.api_listener.actual_port,
            mesh_point_port=self.mesh_listener.actual_port,
        )
        super().startService()

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
        for server in self.servers:
            try:
                server.serve(ids, reuse_port=self.worker is not None)
            except FatalError as e:
                self.fatal(e.code, e.message)
                return
        if self.on_ready is not None:
            self.on_ready()

    def reconfigure(self, old: Config, new: Config) -> None:
        """SIGHUP: the API server's "new conns" keys; removed users' API sockets closed (4001).

        The access control itself is the root's (shared with the center API); the root applied it.
        """
        self.config = new
        if new.engine.api_server != old.engine.api_server:
            self.api_factory.reconfigure(new.engine.api_server)
        if new.access != old.access:
            self.api_factory.users_replaced()

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop accepting, close clients with 1001 and wait (bounded) for them, unregister."""
        service.Service.stopService(self)
        yield gatherResults([server.stop_accepting() for server in self.servers])
        for server in self.servers:
            server.close_clients()
        self.api_factory.shutdown()
        yield self._drained(STOP_GRACE)
        for child in (self.queue_service, self.mesh_peers, self.lua_clients, self.center_link):
            yield maybeDeferred(child.stopService)
        for child in reversed(list(self)):  # the listeners, last
            if child.running:
                yield maybeDeferred(child.stopService)

    def _drained(self, timeout: float) -> Deferred:
        """Fires when every client and API connection has gone, or after ``timeout`` seconds."""
        done: Deferred = Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            left = len(self.api_factory.open_protocols)
            left += sum(len(f.open_protocols) for f in self.client_factories)
            if left == 0 or self.reactor.seconds() >= deadline:
                done.callback(left)
            else:
                self.reactor.callLater(0.05, check)

        check()
        return done
