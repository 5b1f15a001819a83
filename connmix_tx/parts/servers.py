"""Protocol servers: one ``ProtocolServer`` child service per ``engine.servers[]`` entry.

A ``ProtocolServer`` owns its Lua script (loaded when the tree is built: a missing or broken entry
is exit 2), the script's ``mix`` library, its hot reloader (polling while the tree runs) and,
once the engine is registered at the center (``serve``), the client factory of its protocol and
the ``Listener`` of its port.  On SIGHUP ``reconfigure`` applies ``engine.luavm.maxInstructions``
to the script, ``byteCodeExpires`` to the hot reloader, ``options`` to what ``mix.server.option``
reads and the "new conns" keys to the factory (docs/configuration.md).

A clean stop is two steps the engine part orders around its other children:
``stop_accepting`` (hot reloader and listener) then ``close_clients`` (1001 / close).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from connmix_tx.config import Config, ServerConfig
from connmix_tx.engine.connections import ConnectionRegistry
from connmix_tx.engine.socket_server import SocketServerFactory
from connmix_tx.engine.websocket import ClientWebSocketFactory
from connmix_tx.errors import EXIT_CONFIG, FatalError
from connmix_tx.ids import Snowflake
from connmix_tx.listeners import Listener
from connmix_tx.lua.mixlib import MixLibrary
from connmix_tx.lua.runtime import Script, ScriptError
from connmix_tx.lua.reload import HotReloader
from connmix_tx.meter import ServerMeter
from connmix_tx.reactors import IReactor

if TYPE_CHECKING:  # the engine part builds its protocol servers
    from connmix_tx.parts.engine import EnginePart

@implementer(IProtocolFactory)
class ServerFactory(Protocol):
    """The client factory of one protocol server, as its ``ProtocolServer`` uses it.

    A Twisted protocol factory (the listener serves it) that also knows its open connections,
    takes the "new conns" keys of a new ``ServerConfig`` on SIGHUP and closes every client.
    """

    @property
    def config(self) -> ServerConfig:
        """The server settings new connections are accepted with."""

    @property
    def open_protocols(self) -> set[Any]:
        """The connections currently open on this server."""

    def reconfigure(self, config: ServerConfig) -> None:
        """Use ``config``'s "new conns" keys for the connections accepted from now on."""

    def shutdown(self) -> None:
        """Close every client (WebSocket 1001, TCP close) and stop the timers."""

    def buildProtocol(self, addr: IAddress) -> IProtocol | None: ...

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class ServerFactoryMaker(Protocol):
    """What builds a ``ServerFactory``: the factory class of a ``servers[].protocol``."""

    def __call__(
        self,
        config: ServerConfig,
        script: Script,
        connections: ConnectionRegistry,
        ids: Snowflake,
        clock: IReactorTime,
        meter: ServerMeter | None = None,
    ) -> ServerFactory: ...


#: ``servers[].protocol`` -> the factory of its listener.
SERVER_FACTORIES: dict[str, ServerFactoryMaker] = {
    "websocket": ClientWebSocketFactory,
    "socket": SocketServerFactory,
}

server_log = Logger(namespace="connmix.server")


class ProtocolServer(service.MultiService):
    """``engine.servers[index]``: its script, hot reloader and, once registered, its listener.

    :param engine: what the script's ``mix`` library works on: ``connections``, ``router``,
        ``queues``, ``http``, ``redis`` and ``metrics`` of the engine part.
    """

    def __init__(self, index: int, config: Config, reactor: IReactor, engine: EnginePart) -> None:
        super().__init__()
        self.index = index
        self.key = f"engine.servers[{index}]"
        self.setName(f"servers[{index}]")
        self.config: ServerConfig = config.engine.servers[index]
        self.reactor = reactor
        self.engine = engine
        self.library, self.script = self._load(config)
        #: The Lua hot reloader (``byteCodeExpires``); replaceable before start (tests).
        self.hot_reloader = HotReloader(
            self.script, reactor, self.config.byte_code_expires, meter=engine.metrics
        )
        self.factory: ServerFactory | None = None
        self.listener: Listener | None = None

    def _load(self, config: Config) -> tuple[MixLibrary, Script]:
        server, engine = self.config, self.engine
        if server.protocol not in SERVER_FACTORIES:
            raise FatalError(EXIT_CONFIG, f"config {self.key}.protocol: {server.protocol} servers are not available")
        library = MixLibrary(
            engine.connections, engine.router, engine.queues, self.reactor, dict(server.options),
            http=engine.http, redis=engine.redis,
        )
        script = Script(
            server.entry, server.protocol, library.functions(), self.reactor,
            max_memory_mib=config.engine.luavm.max_memory,
            max_instructions=config.engine.luavm.max_instructions,
            extensions=library.extensions(),
        )
        library.bind(script)
        try:
            script.load()
        except ScriptError as e:
            raise FatalError(EXIT_CONFIG, f"config {self.key}.entry: {e}") from None
        return library, script

    def startService(self) -> None:
        super().startService()
        self.hot_reloader.start()

    def serve(self, ids: Snowflake, reuse_port: bool) -> None:
        """Build the client factory and open the listener (the engine is registered).

        :raises FatalError: the port cannot be bound (exit 3) or its TLS files are bad (exit 2).
        """
        server, script = self.config, self.script
        meter = self.engine.metrics.server(server.protocol, script.chunk_name(server.entry))
        factory = SERVER_FACTORIES[server.protocol](
            server, script, self.engine.connections, ids, self.reactor, meter=meter
        )
        listener = Listener(
            self.reactor, self.key, server, factory,
            lambda address: server_log.info(
                "start the protocol server {entry} ({address})", entry=server.entry, address=address
            ),
            reuse_port=reuse_port,
        )
        # Joining the running server opens the port; a listener that fails stays a stopped child.
        listener.setServiceParent(self)
        self.factory, self.listener = factory, listener

    def stop_accepting(self) -> Deferred:
        """The first step of a clean stop: no more polling, no more connections."""
        service.Service.stopService(self)
        self.hot_reloader.stop()
        if self.listener is None or not self.listener.running:
            return succeed(None)
        return maybeDeferred(self.listener.stopService)

    def close_clients(self) -> None:
        """The second step: close every client (WebSocket 1001, TCP close)."""
        if self.factory is not None:
            self.factory.shutdown()

    def stopService(self) -> Deferred:
        """Both steps, for a protocol server stopped on its own."""
        if not self.running:
            return succeed(None)
        return self.stop_accepting().addCallback(lambda _: self.close_clients())

    def reconfigure(self, old: Config, new: Config) -> None:
        """SIGHUP: this server's hot keys and the engine's instruction limit."""
        limit = new.engine.luavm.max_instructions
        if limit != old.engine.luavm.max_instructions:
            self.script.set_instruction_limit(limit)
        server, before = new.engine.servers[self.index], old.engine.servers[self.index]
        self.config = server
        if server == before:
            return
        if server.byte_code_expires != before.byte_code_expires:
            self.hot_reloader.set_interval(server.byte_code_expires)
        if server.options != before.options:
            self.library.options.clear()
            self.library.options.update(server.options)
        if self.factory is not None:
            self.factory.reconfigure(server)
