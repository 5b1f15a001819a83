"""The ``protocol: socket`` server (docs/lua-api.md, "socket servers"): raw TCP, the framing is done
by Lua.

The engine only moves bytes.  ``SocketServerProtocol`` keeps the unconsumed input of one
connection and runs the input loop: ``protocol_input`` on a snapshot of that input says where a
packet ends, ``protocol_decode`` turns the packet into a value and ``on_message`` gets the value
through the connection's ``CallbackSession`` (so ordering and the pending limit are the same as on
websocket servers).  Outbound, ``conn:send`` writes raw bytes while every delivery from outside the
script (API, mesh, publish) goes through ``protocol_encode``.  ``SocketServerFactory`` holds what
the connections of one configured server share.

Outbound limits (docs/robustness.md, "Clients"): above the connection's ``maxWriteBuffer`` a client
is a slow consumer and is aborted; a queue that does not move for ``writeTimeout`` seconds aborts it
too.  As on websocket servers, a connection keeps the settings it was accepted with (``limits``).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.config import ServerConfig
from connmix_tx.engine.connections import (
    CLOSED,
    ENCODE_FAILED,
    SLOW_CONSUMER,
    ClientConnection,
    ConnectionRegistry,
)
from connmix_tx.engine.outbound import buffered_bytes
from connmix_tx.engine.session import CallbackSession, ProtocolServerFactory, open_client
from connmix_tx.engine.ws_settings import WRITE_TIMEOUT
from connmix_tx.meter import NULL_METER, ServerMeter
from connmix_tx.ids import Snowflake
from connmix_tx.lua.runtime import Script, ScriptError
from connmix_tx.reactors import IStreamTransport

log = Logger(namespace="connmix.server")
lua_log = Logger(namespace="connmix.lua")

TEXT, BINARY = b"text", b"binary"

INPUT_REJECTED = "protocol error: input rejected"
LUA_ERROR = "protocol error: lua error"
TOO_LARGE = "message too large"


class SocketServerProtocol(Protocol):
    """One end-user TCP connection of a socket server; implements ``ClientTransport``."""

    factory: "SocketServerFactory"
    #: Set once the connection is made; a connected stream (write, abort, pause reading).
    transport: IStreamTransport
    conn: ClientConnection | None = None
    session: CallbackSession | None = None
    last_received = 0.0
    meter: ServerMeter = NULL_METER
    #: The server settings this connection was accepted with ("new conns" keys).
    limits: ServerConfig
    write_timeout = 0
    max_write_buffer = 0

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._closing = False  # we asked the transport to close (or it is gone)
        self._close_err: str | None = None
        self._in_input = False  # protocol_input is running: clear_buffer is deferred to its end
        self._clear_requested = False
        self._processing = False
        self._paused = False

    # Twisted events ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self.limits = limits = factory.config
        self.write_timeout, self.max_write_buffer = limits.write_timeout, limits.max_write_buffer
        self.meter = factory.meter
        self.wheel = factory.wheel
        factory.open_protocols.add(self)
        self.last_received = factory.clock.seconds()
        self.wheel.watch(self)
        self.conn, self.session = conn, _ = open_client(factory, self)
        self.session.start("on_connect", conn.cid).addCallback(self._connected)

    def _connected(self, outcome: tuple[bool, tuple]) -> None:
        ok, _ = outcome
        conn = self.conn
        if conn is None or conn.closed or self._closing:
            return
        if not ok:
            self._close("lua error")  # on_close still runs (docs/lua-api.md, Errors)
            return
        conn.ready = True
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    def dataReceived(self, data: bytes) -> None:
        self.last_received = self.factory.clock.seconds()
        if self._closing:
            return
        self._buffer += data
        conn = self.conn
        if conn is not None and conn.ready:
            self._process()
            session = self.session
            if session is not None and session.pending:
                self.factory.backlog.pause(self)
        elif len(self._buffer) > self.limits.max_message_size and not self._paused:
            # on_connect still waits: keep what arrived, but let TCP hold back the rest rather
            # than buffering without bound.  Reading resumes once on_connect has finished.
            self._paused = True
            self.transport.pauseProducing()

    def may_read(self) -> bool:
        """Whether ``Backlog`` may read again (not closing, not paused while on_connect runs)."""
        return not self._closing and not self._paused

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        factory = self.factory
        factory.open_protocols.discard(self)
        self.wheel.forget(self)
        factory.write_watch.forget(self)
        factory.backlog.forget(self)
        self._buffer.clear()
        conn, session = self.conn, self.session
        if conn is None or session is None or conn.closed:
            return
        if self._closing:
            err = self._close_err
        else:
            self._closing = True
            err = None if reason.check(ConnectionDone) else "connection lost"
        factory.connections.unsubscribe(conn, list(conn.channels))
        log.debug("client {client_id} closed: {reason}", client_id=conn.client_id, reason=err or "normal")
        # The session first drops the queued messages and queues on_close; only then are the
        # context waiters woken (with "closed"), so a callback suspended in wait_context_value
        # finishes and on_close follows it, without the dropped messages running in between.
        session.close(err)
        conn.mark_closed()

    # The input loop (docs/lua-api.md, "socket servers") -------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return  # already looping further up the stack (a callback ran synchronously)
        self._processing = True
        try:
            self._input_loop()
        finally:
            self._processing = False

    def _input_loop(self) -> None:
        factory = self.factory
        script = factory.script
        conn = self.conn
        assert conn is not None and self.session is not None
        cid = conn.cid
        # One Lua string for a run of packets: the buffer objects are views of it at ``offset``
        # (``remaining`` bytes of it are unconsumed), so the rest of a read is not copied into
        # Lua again for every packet.
        source: Any = None
        offset = remaining = 0
        while self._buffer and not self._closing:
            size = len(self._buffer)
            if source is None or size != remaining:
                # The first packet, or the buffer changed under the loop: a fresh snapshot.
                source, offset = script.table([bytes(self._buffer)]), 0
            self._in_input, self._clear_requested = True, False
            try:
                values = script.call_protocol("protocol_input", cid, factory.new_buffer(source, offset))
            except ScriptError as e:
                self._lua_error("protocol_input", str(e))
                self._close(LUA_ERROR)
                return
            finally:
                self._in_input = False
            n = values[0] if values else None
            if self._clear_requested:
                # conn:clear_buffer() inside protocol_input: the result counts only if it is -1.
                self._buffer.clear()
                if _is_integer(n) and n == -1:
                    self._close(INPUT_REJECTED)
                return
            if self._closing:
                return  # the script closed the connection (conn:close()) while framing
            if not _is_integer(n) or n < -1 or n > size:
                log.error(
                    "protocol_input ({entry}) client {client_id} returned {value!r} for {size} bytes",
                    entry=script.chunk_name(script.entry),
                    client_id=conn.client_id,
                    value=n,
                    size=size,
                )
                self._close(f"protocol error: invalid protocol_input result {_describe(n)}")
                return
            if n == 0:
                break
            if n == -1:
                self._close(INPUT_REJECTED)
                return
            count = int(n)
            packet = bytes(self._buffer[:count])
            del self._buffer[:count]
            offset, remaining = offset + count, size - count
            try:
                decoded = script.call_protocol("protocol_decode", cid, packet)
            except ScriptError as e:
                self._lua_error("protocol_decode", str(e))
                self._close(LUA_ERROR)
                return
            if decoded and decoded[0] is not None and not self._closing:
                self._message(decoded[0])
        if len(self._buffer) > self.limits.max_message_size and not self._closing:
            self._close(TOO_LARGE)

    def _message(self, value: Any) -> None:
        """Queue ``on_message(value)``; the 257th waiting message closes (docs/lua-api.md,
        "Coroutines and waiting")."""
        assert self.session is not None
        self.meter.read.inc()
        self.session.call("on_message", value)  # applies the pending limit

    def _lua_error(self, callback: str, message: str) -> None:
        """Log an error raised by a framing callback (docs/lua-api.md, Errors)."""
        script = self.factory.script
        assert self.conn is not None
        self.meter.lua_error(callback)
        lua_log.error(
            "lua error in {callback} ({entry}) client {client_id}: {error}",
            callback=callback,
            entry=script.chunk_name(script.entry),
            client_id=self.conn.client_id,
            error=message,
        )

    # Closing -------------------------------------------------------------------------------

    def _close(self, err: str | None) -> None:
        """Flush pending output, then close TCP; ``on_close`` will get ``err``."""
        if self._closing:
            return
        self._closing = True
        self._close_err = err
        self._buffer.clear()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _finished(self) -> None:
        if self.conn is not None:
            self.factory.connections.remove(self.conn)

    def _drained(self) -> None:
        """The session's queue is empty: read again (``Backlog``)."""
        self.factory.backlog.drained(self)

    def _overflow(self) -> None:
        self._close("too many pending messages")

    def idle_timeout(self) -> None:
        self._close("read timeout")

    def write_timed_out(self) -> None:
        """Nothing queued for this client was taken for ``writeTimeout`` seconds: abort."""
        self._abort(WRITE_TIMEOUT)

    def _abort(self, err: str) -> None:
        """Drop the connection at once, queued output included; ``on_close`` gets ``err``."""
        if self._closing and self._close_err is not None:
            err = self._close_err
        self._closing = True
        self._close_err = err
        self._buffer.clear()
        self.transport.abortConnection()

    def _written(self) -> str | None:
        """After a write: the slow-consumer check and the write watch (docs/robustness.md)."""
        buffered = buffered_bytes(self.transport)
        if buffered > self.max_write_buffer:
            self.meter.errors.inc()
            if not self._closing or self._close_err != SLOW_CONSUMER:
                assert self.conn is not None
                log.warn("close slow client {client_id} buffered={bytes}",
                         client_id=self.conn.client_id, bytes=buffered)
                self.meter.slow.inc()
                self._abort(SLOW_CONSUMER)
            return SLOW_CONSUMER
        self.meter.sent.inc()
        if buffered and self.write_timeout and not self.factory.outbox.holds(self.transport):
            self.factory.write_watch.written(self)  # (the outbox tells it after its flush)
        return None

    def shutdown(self) -> None:
        """The server stops."""
        self._close("server stopping")

    # ClientTransport -----------------------------------------------------------------------

    def send_message(self, data: bytes, binary: bool) -> str | None:
        """``conn:send`` on a socket server: the bytes as they are (the type is ignored)."""
        if self._closing or self.conn is None or self.conn.closed:
            self.meter.errors.inc()
            return CLOSED
        if not data:
            return None
        self.factory.outbox.write(self.transport, data, self)
        return self._written()

    def deliver(self, data: bytes, binary: bool, shared: dict[str, Any]) -> str | None:
        """A message from outside the script: through ``protocol_encode`` for every recipient.

        The encoded frame is not shared between recipients: an encoder may depend on the state of
        its connection (a websocket codec before its handshake, for example).
        """
        conn = self.conn
        if self._closing or conn is None or not conn.live:
            self.meter.errors.inc()
            return CLOSED
        script = self.factory.script
        try:
            values = script.call_protocol("protocol_encode", conn.cid, data, BINARY if binary else TEXT)
        except ScriptError as e:
            self._lua_error("protocol_encode", str(e))
            self.meter.errors.inc()
            return ENCODE_FAILED
        frame = values[0] if values else None
        if not isinstance(frame, bytes) or not frame:
            log.debug(
                "protocol_encode ({entry}) client {client_id} returned {value!r}: delivery failed",
                entry=script.chunk_name(script.entry),
                client_id=conn.client_id,
                value=frame,
            )
            self.meter.errors.inc()
            return ENCODE_FAILED
        if self._closing:
            self.meter.errors.inc()
            return CLOSED  # protocol_encode closed the connection
        self.factory.outbox.write(self.transport, frame, self)
        return self._written()

    def close_connection(self) -> None:
        """``conn:close()``: a clean close (``on_close`` gets nil)."""
        self._close(None)

    def clear_buffer(self) -> str | None:
        """``conn:clear_buffer()``: inside protocol_input at its end, elsewhere right away."""
        if self._in_input:
            self._clear_requested = True
        else:
            self._buffer.clear()
        return None


def _is_integer(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def _describe(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bytes):
        return repr(value.decode("utf-8", "replace"))
    return repr(value)


class SocketServerFactory(ProtocolServerFactory, Factory[SocketServerProtocol]):
    """Everything the connections of one ``protocol: socket`` server share."""

    protocol = SocketServerProtocol
    noisy = False

    def __init__(
        self,
        config: ServerConfig,
        script: Script,
        connections: ConnectionRegistry,
        ids: Snowflake,
        clock: IReactorTime,
        meter: ServerMeter | None = None,
    ) -> None:
        self.config = config
        self.share(script, connections, ids, clock, meter if meter is not None else NULL_METER,
                   config.read_timeout)
        # The Lua buffer object of docs/lua-api.md (engine.new_buffer in bootstrap.lua).
        self.new_buffer = script.new_buffer

    def reconfigure(self, config: ServerConfig) -> None:
        """Use ``config``'s "new conns" keys for the connections accepted from now on."""
        self.config = config
        self.renew_wheel(config.read_timeout)
