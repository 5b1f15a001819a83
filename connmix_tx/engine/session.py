"""Per-connection ordering of Lua callbacks (docs/lua-api.md: "Coroutines and waiting",
the pending limit, "Errors").

A ``CallbackSession`` runs the callbacks of one connection strictly one after another: while one
is suspended (waiting), decoded messages queue up (at most ``MAX_PENDING``); ``on_close`` runs once,
after the current callback, and messages that have not started by then are dropped.  It is a plain
class: the transport tells it what happened, the ``Script`` runs the Lua.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from connmix_tx.engine.connections import ClientConnection, ConnectionRegistry, peer_address
from connmix_tx.engine.backlog import Backlog
from connmix_tx.engine.outbound import WriteWatch
from connmix_tx.engine.outbox import Outbox
from connmix_tx.engine.timeouts import IdleWheel
from connmix_tx.ids import Snowflake
from connmix_tx.lua.runtime import Script
from connmix_tx.meter import ServerMeter

log = Logger(namespace="connmix.lua")

MAX_PENDING = 256

Job = Callable[[Callable[[bool, Any], None]], None]


class CallbackSession:
    """The Lua side of one connection."""

    # One per client connection: no per-instance dict (docs/performance.md, idle memory).
    __slots__ = ("script", "conn", "_on_overflow", "_on_finished", "_on_error", "_on_drained", "_busy",
                 "_running", "_draining", "_pending", "_closing", "_close_err")

    def __init__(
        self,
        script: Script,
        conn: ClientConnection,
        on_overflow: Callable[[], None],
        on_finished: Callable[[], None],
        on_error: Callable[[str, str], None] | None = None,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.script = script
        self.conn = conn
        self._on_overflow = on_overflow
        self._on_finished = on_finished
        self._on_error = on_error
        #: Called when the last queued callback has started (``Backlog.drained``).
        self._on_drained = on_drained
        self._busy = False
        #: The name of the callback running now (what ``_job_done`` reports).
        self._running = ""
        self._draining = False
        #: (callback, job, message): a queued message has no job, only its (kind, data).
        self._pending: deque[tuple[str, Job | None, tuple[bytes, bytes] | None]] = deque()
        self._closing = False
        self._close_err: str | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self, callback: str, *args: Any) -> Deferred:
        """Run a callback that the transport waits for (``on_handshake`` / ``on_connect``).

        Fires with ``(ok, values)``: ``ok`` False when the callback raised (already logged).
        """
        result: Deferred = Deferred()

        def job(done: Callable[[bool, Any], None]) -> None:
            def finished(ok: bool, values: Any) -> None:
                done(ok, values)
                result.callback((ok, values))

            self.script.run(callback, self.conn.cid, args, finished)

        self._submit(callback, job)
        return result

    def message(self, kind: bytes, data: bytes) -> None:
        """A decoded message arrived: run ``on_message`` now or after the current callback."""
        if not self._busy and not self._pending and not self._closing:
            # The common case, without queueing: nothing else runs for this connection.
            self._busy = True
            self.script.run_message(self.conn.cid, kind, data, self._message_done)
        elif self._room():
            self._pending.append(("on_message", None, (kind, data)))  # (no closure per message)
            if not self._busy:
                self._next()

    def _message_done(self, ok: bool, values: Any) -> None:
        self._done("on_message", ok, values)

    def _job_done(self, ok: bool, values: Any) -> None:
        self._done(self._running, ok, values)

    def call(self, callback: str, *args: Any) -> None:
        """Queue a callback like ``message`` does (e.g. socket ``on_message`` with a decoded value)."""
        if self._room():
            self._submit(callback, lambda done: self.script.run(callback, self.conn.cid, args, done))

    def _room(self) -> bool:
        """False when closing, or when the pending limit is reached (then the overflow closes)."""
        if self._closing:
            return False
        if len(self._pending) >= MAX_PENDING:
            log.warn(
                "client {client_id} has too many pending messages ({count}); closing",
                client_id=self.conn.client_id,
                count=len(self._pending),
            )
            self._on_overflow()
            return False
        return True

    def close(self, err: str | None) -> None:
        """The connection ended: drop queued messages, run ``on_close`` once after the current one."""
        if self._closing:
            return
        self._closing = True
        self._close_err = err
        self._pending.clear()
        self._submit("on_close", self._run_close)

    def close_silently(self) -> None:
        """The connection ended before it was accepted (refused handshake): no ``on_close``."""
        self._closing = True
        self._pending.clear()
        if not self._busy:
            self._finish()
        else:
            self._pending.append(("", lambda done: self._finish(), None))

    def _finish(self) -> None:
        self.script.forget_connection(self.conn.cid)
        self._on_finished()

    def _run_close(self, done: Callable[[bool, Any], None]) -> None:
        args = (self.conn.cid, None if self._close_err is None else self._close_err.encode())

        def finished(ok: bool, values: Any) -> None:
            done(ok, values)
            self._finish()

        try:
            self.script.run("on_close", self.conn.cid, args, finished)
        except Exception as e:
            log.failure("on_close failed in the engine")
            finished(False, f"internal error: {e}")

    def _submit(self, name: str, job: Job) -> None:
        self._pending.append((name, job, None))
        if not self._busy:
            self._next()

    def _next(self) -> None:
        if self._draining:
            return  # the loop below is already running further up the stack
        self._draining = True
        try:
            while self._pending and not self._busy:
                name, job, message = self._pending.popleft()
                if not self._pending and self._on_drained is not None:
                    self._on_drained()
                self._busy, self._running = True, name
                try:
                    if job is None:
                        assert message is not None
                        self.script.run_message(self.conn.cid, message[0], message[1], self._job_done)
                    else:
                        job(self._job_done)
                except Exception as e:
                    # Not the script's doing (the runtime reports Lua errors through done); the
                    # connection's later callbacks, on_close above all, must still run.
                    log.failure("callback {callback} failed in the engine", callback=name)
                    if self._busy:  # done was not called (calling it ends "busy": see _done)
                        self._done(name, False, f"internal error: {e}")
        finally:
            self._draining = False

    def _done(self, name: str, ok: bool, values: Any) -> None:
        if not ok and name:
            log.error(
                "lua error in {callback} ({entry}) client {client_id}: {error}",
                callback=name,
                entry=self.script.chunk_name(self.script.entry),
                client_id=self.conn.client_id,
                error=values,
            )
            if self._on_error is not None:
                self._on_error(name, values)
        self._busy = False
        self._next()


def open_client(factory: Any, proto: Any) -> tuple[ClientConnection, CallbackSession]:
    """A connection accepted by a protocol server: its client id, its entry in the registry,
    its Lua session and its debug line.

    ``factory`` offers ``ids``, ``connections``, ``script`` and ``meter``; ``proto`` is the
    ``ClientTransport`` with ``_overflow``, ``_finished`` and ``_drained`` callbacks.
    """
    conn = ClientConnection(factory.ids.next_id(), peer_address(proto.transport), proto)
    factory.connections.add(conn)
    session = CallbackSession(
        factory.script, conn, on_overflow=proto._overflow, on_finished=proto._finished,
        on_error=factory.meter.lua_error, on_drained=proto._drained,
    )
    log.debug(
        "client {client_id} connected from {remote_addr} on {port}",
        client_id=conn.client_id,
        remote_addr=conn.remote_addr,
        port=proto.transport.getHost().port,
    )
    return conn, session


class ProtocolServerFactory:
    """What the factories of both protocol-server kinds (websocket, socket) share: the engine
    objects their connections use, the idle wheels, the write watch and the clean stop.

    A mixin: the concrete factory also derives from Autobahn's or Twisted's factory and calls
    ``share(...)`` from its ``__init__``; its protocols implement ``shutdown()``.
    """

    def share(
        self,
        script: Script,
        connections: ConnectionRegistry,
        ids: Snowflake,
        clock: IReactorTime,
        meter: ServerMeter,
        read_timeout: float,
    ) -> None:
        self.script = script
        self.connections = connections
        self.ids = ids
        self.clock = clock
        self.meter = meter
        self.write_watch = WriteWatch(clock)
        #: Writes to the clients, sent once per reactor turn (connmix_tx/engine/outbox.py).
        self.outbox = Outbox(clock, self.write_watch)
        #: Clients not read while their callbacks are behind (connmix_tx/engine/backlog.py).
        self.backlog = Backlog(clock)
        self.wheel = IdleWheel(clock, read_timeout)
        self._wheels = [self.wheel]
        self.open_protocols: set[Any] = set()

    def renew_wheel(self, read_timeout: float) -> None:
        """A new readTimeout (SIGHUP): connections accepted from now on use a new wheel; open
        ones keep the wheel (and timeout) they were accepted with."""
        if read_timeout != self.wheel.timeout:
            self.wheel = IdleWheel(self.clock, read_timeout)
            self._wheels = [w for w in self._wheels if len(w)] + [self.wheel]

    def shutdown(self) -> None:
        """Close every client and stop the idle wheels and the write watch."""
        for proto in list(self.open_protocols):
            proto.shutdown()
        for wheel in self._wheels:
            wheel.stop()
        self.write_watch.stop()
        self.backlog.stop()
