"""The ``protocol: websocket`` server (docs/configuration.md, ``engine.servers``): Autobahn does the
framing, Lua the logic.

``WebSocketServerFactory`` holds what all connections of one configured server share (script,
id generator, idle wheel, write watch, options); ``ClientWebSocketProtocol`` is a thin adapter that
turns Autobahn's events into calls on the connection's ``CallbackSession`` and implements
``ClientTransport`` for the engine.

The "new conns" keys of the server (docs/configuration.md: timeouts, sizes, ``options``,
``compression``) are read when a connection is accepted: a protocol keeps the ``ServerConfig`` it
started with (``limits``) and its idle wheel, and ``reconfigure`` (SIGHUP) changes only what the
factory hands to later connections.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.config import ServerConfig
from connmix_tx.engine.connections import (
    CLOSED,
    INVALID_UTF8,
    SLOW_CONSUMER,
    ClientConnection,
    ConnectionRegistry,
)
from connmix_tx.engine.frames import frame, write_frame, write_message
from connmix_tx.engine.outbound import buffered_bytes, pause_reading, resume_reading
from connmix_tx.engine.session import CallbackSession, ProtocolServerFactory, open_client
from connmix_tx.engine.ws_settings import (
    CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_SLOW, CLOSE_TOO_BIG, WRITE_TIMEOUT, ExactTimer,
    end_message, websocket_options,
)
from connmix_tx.ids import Snowflake
from connmix_tx.lua.convert import MemoryShortage, py_to_lua
from connmix_tx.lua.runtime import Script
from connmix_tx.meter import NULL_METER, ServerMeter

TEXT, BINARY = b"text", b"binary"
#: The largest opening handshake request (request line and headers) a protocol server reads;
#: a bigger one is answered ``431`` and closed before more of it is buffered.
MAX_HANDSHAKE = 16384
_END_OF_HEADER = b"\r\n\r\n"
#: A refusal reason from ``on_handshake`` is cut to this many characters.
MAX_REASON = 120
log = Logger(namespace="connmix.server")




def origin_allowed(origin: str | None, patterns: tuple[str, ...] | None) -> bool:
    """The ``origins`` option (docs/operations.md, "Browsers and the API"): fnmatch globs,
    case-insensitive; a missing Origin is allowed."""
    if patterns is None or not origin:
        return True
    origin = origin.strip().lower()
    return any(fnmatchcase(origin, pattern) for pattern in patterns)


def origin_patterns(option: str | None) -> tuple[str, ...] | None:
    """The globs of an ``origins`` option (lower-cased), or None when any origin is allowed."""
    patterns = tuple(p.strip().lower() for p in (option or "*").split(",") if p.strip())
    return None if not patterns or "*" in patterns else patterns


def refusal(values: tuple) -> tuple[int, str]:
    """The HTTP status and reason of ``return false, status, reason`` from ``on_handshake``.

    Both go into the HTTP status line, so they are sanitised: a status outside 400-599 (or not
    an integer) becomes 403; the reason keeps only printable characters (no CR LF: no response
    splitting), at most ``MAX_REASON`` of them, "Forbidden" when nothing is left.
    """
    status = values[1] if len(values) > 1 else None
    if isinstance(status, float) and status.is_integer():
        status = int(status)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        status = 403
    raw = values[2] if len(values) > 2 else None
    reason = ""
    if isinstance(raw, bytes):
        text = raw[: MAX_REASON * 4].decode("utf-8", "replace")
        reason = "".join(ch for ch in text if ch.isprintable()).strip()[:MAX_REASON]
    return status, reason or "Forbidden"


#: The states in which ``Backlog`` may resume reading (see ``may_read``).
_READABLE = (WebSocketServerProtocol.STATE_OPEN, WebSocketServerProtocol.STATE_CLOSING)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ClientWebSocketProtocol(WebSocketServerProtocol):
    """One end-user WebSocket connection."""

    factory: "ClientWebSocketFactory"
    conn: ClientConnection | None = None
    session: CallbackSession | None = None
    last_received = 0.0
    _close_err: str | None = None
    meter: ServerMeter = NULL_METER
    #: The server settings this connection was accepted with ("new conns" keys).
    limits: ServerConfig
    write_timeout = 0
    max_write_buffer = 0
    #: ``on_handshake`` was started: later bytes wait for the upgrade, never a second handshake.
    _handshaking = False
    _paused = False
    #: A slow consumer: reading stays off until the connection is dropped.
    _deaf = False

    # Twisted / Autobahn events ---------------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self.limits = limits = factory.config
        self.write_timeout, self.max_write_buffer = limits.write_timeout, limits.max_write_buffer
        self.meter = factory.meter
        self.wheel = factory.wheel
        super().connectionMade()
        factory.open_protocols.add(self)
        self.last_received = factory.clock.seconds()
        self.wheel.watch(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.open_protocols.discard(self)
        self.factory.write_watch.forget(self)
        self.factory.backlog.forget(self)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        # Any bytes count as activity (frames, pings, pongs).  Autobahn's own dataReceived only
        # adds a debug log call per chunk, so go straight to the framing code.
        self.last_received = self.factory.clock.seconds()
        if self.state != self.STATE_OPEN and not self._before_open(data):
            return
        self._dataReceived(data)
        session = self.session
        if session is not None and session.pending and self.state == self.STATE_OPEN:
            self.factory.backlog.pause(self)

    def may_read(self) -> bool:
        """Whether ``Backlog`` may read again: open, or closing and waiting for the client's close
        frame; not while the handshake paused reading, nor for a slow consumer."""
        return self.state in _READABLE and not self._paused and not self._deaf

    def _before_open(self, data: bytes) -> bool:
        """Whether Autobahn may take ``data`` now (the connection is not open yet).

        One WebSocket per TCP connection: once ``on_handshake`` runs, whatever else arrives is
        kept for after the upgrade (as frames) and never parsed as another handshake; reading
        pauses while more than ``maxMessageSize`` waits.  The request itself is capped at
        ``MAX_HANDSHAKE`` bytes (431), so Autobahn never buffers and re-scans a huge header.
        """
        state = self.state
        if state == self.STATE_CLOSED:
            return False
        if state != self.STATE_CONNECTING:
            return True
        if self._handshaking:
            self.data += data
            if len(self.data) > self.limits.max_message_size and not self._paused:
                self._paused = True
                pause_reading(self.transport)
            return False
        if len(self.data) + len(data) > MAX_HANDSHAKE:
            end = (self.data + data).find(_END_OF_HEADER, 0, MAX_HANDSHAKE + 4)
            if end < 0 or end + 4 > MAX_HANDSHAKE:
                log.info("refuse handshake from {peer}: request header over {limit} bytes",
                         peer=self.peer, limit=MAX_HANDSHAKE)
                self.failHandshake("Request Header Fields Too Large", 431)
                return False
        return True

    # Autobahn runs onConnect through txaio.as_future and accepts a Deferred, but types the
    # result as the accepted subprotocol only.
    def onConnect(self, request: Any) -> Deferred:  # type: ignore[override]
        factory = self.factory
        path = factory.path
        if path != "/" and not request.path.startswith(path):
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "Not Found")
        if not origin_allowed(request.headers.get("origin"), factory.origins):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "Origin Not Allowed")
        runtime = factory.script.runtime
        try:
            headers = py_to_lua(runtime, dict(request.headers))
        except MemoryShortage:  # the script's memory is spent: refused like a failing on_handshake
            log.warn("refuse handshake from {peer}: the lua runtime has no memory for it", peer=self.peer)
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR, "Internal Server Error") from None
        self._handshaking = True
        self.conn, self.session = conn, _ = open_client(factory, self)
        server = {
            b"Method": b"GET",
            b"RequestUri": self.http_request_uri.encode(),
            b"ServerProtocol": b"HTTP/1.1",
            b"Host": request.headers.get("host", "").encode(),
            b"RemoteAddr": conn.remote_addr.encode(),
        }
        return self.session.start("on_handshake", conn.cid, headers, runtime.table_from(server)) \
            .addCallback(self._handshake_done)

    def _handshake_done(self, outcome: tuple[bool, tuple]) -> None:
        ok, values = outcome
        if not ok:
            raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR, "Internal Server Error")
        if values and values[0] is False:
            raise ConnectionDeny(*refusal(values))
        return None

    def succeedHandshake(self, res: Any) -> None:
        if self.state != self.STATE_CONNECTING:
            return  # the peer left (or was dropped) while on_handshake ran: no 101 to nobody
        super().succeedHandshake(res)

    def onOpen(self) -> None:
        if self.conn is not None:
            self.conn.ready = True
        if self._paused:
            self._paused = False
            resume_reading(self.transport)

    def onPing(self, payload: bytes) -> None:
        """Autobahn answers a ping itself; the pong counts against the outbound limits like
        any message (a client that pings and never reads is a slow consumer)."""
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)
            buffered = buffered_bytes(self.transport)
            if buffered > self.max_write_buffer:
                self._slow(buffered)
            elif buffered and self.write_timeout:
                self.factory.write_watch.written(self)

    def onMessageEnd(self) -> None:
        end_message(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.meter.read.inc()
            self.session.message(BINARY if isBinary else TEXT, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.wheel.forget(self)
        conn, session = self.conn, self.session
        if conn is None or session is None or conn.closed:
            return
        accepted = conn.ready
        err = self._close_reason(wasClean)
        log.debug("client {client_id} closed: {reason}", client_id=conn.client_id, reason=err or "normal")
        # The session first: queued messages are dropped before a waiting callback wakes up.
        if accepted:
            session.close(err)
        else:
            session.close_silently()
        conn.mark_closed()
        self.factory.connections.unsubscribe(conn, list(conn.channels))

    def _close_reason(self, was_clean: bool) -> str | None:
        if self._close_err is not None:
            return self._close_err
        local = self.localCloseCode
        if local == CLOSE_TOO_BIG:
            return "message too large"
        if local is not None and local != CLOSE_NORMAL:
            reason = self.localCloseReason
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            return f"protocol error: {reason or local}"
        if was_clean:
            return None
        return "connection lost"

    # Callbacks from the session and the wheel ------------------------------------------------

    def _finished(self) -> None:
        if self.conn is not None:
            self.factory.connections.remove(self.conn)

    def _drained(self) -> None:
        """The session's queue is empty: read again (``Backlog``)."""
        self.factory.backlog.drained(self)

    def _overflow(self) -> None:
        self._close(CLOSE_POLICY, "too many pending messages", "too many pending messages")

    def idle_timeout(self) -> None:
        self._close(CLOSE_NORMAL, "read timeout", "read timeout")

    def write_timed_out(self) -> None:
        """Nothing queued for this client was taken for ``writeTimeout`` seconds: abort."""
        if self._close_err is None:
            self._close_err = WRITE_TIMEOUT
        self.dropConnection(abort=True)

    def _written(self) -> str | None:
        """After a write: the slow-consumer check and the write watch (docs/robustness.md)."""
        buffered = buffered_bytes(self.transport)
        if buffered > self.max_write_buffer:
            self.meter.errors.inc()
            self._slow(buffered)
            return SLOW_CONSUMER
        self.meter.sent.inc()
        if buffered and self.write_timeout and not self.factory.outbox.holds(self.transport):
            self.factory.write_watch.written(self)  # (the outbox tells it after its flush)
        return None

    def _slow(self, buffered: int) -> None:
        """Close with 4008; Autobahn's 1 s close-handshake timeout aborts a peer that never reads
        (the close frame queues behind the data it does not take)."""
        if self._close_err is None:
            client_id = self.conn.client_id if self.conn is not None else "-"
            log.warn("close slow client {client_id} buffered={bytes}", client_id=client_id, bytes=buffered)
            self.meter.slow.inc()
            # Read nothing more from a peer that takes nothing: its frames (pings, messages)
            # would only make more work until the close-handshake timeout drops it.
            self._deaf = True
            pause_reading(self.transport)
        self._close(CLOSE_SLOW, SLOW_CONSUMER, SLOW_CONSUMER)

    def _close(self, code: int, reason: str, err: str | None = None) -> None:
        """Start closing; ``err`` is what ``on_close`` will be told (None: a clean close)."""
        if self._close_err is None:
            self._close_err = err
        if self.state == self.STATE_OPEN:
            # sendClose() only admits 1000 and 3000-4999; the engine also needs 1001 and 1008.
            self.sendCloseFrame(code, reason.encode()[:123], isReply=False)
            # Read the client's answer at once, also behind a waiting callback: Autobahn's
            # close-handshake timer (txaio's batched timer: whole seconds) may fire within
            # milliseconds, and an unread answer turns a clean close into a lost connection.
            self.factory.backlog.drained(self)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def shutdown(self) -> None:
        """The server stops: close with 1001 "going away"."""
        self._close(CLOSE_GOING_AWAY, "server stopping", "server stopping")

    # ClientTransport -------------------------------------------------------------------------

    def send_message(self, data: bytes, binary: bool) -> str | None:
        if self.conn is None or not self.conn.live or self.state != self.STATE_OPEN:
            self.meter.errors.inc()
            return CLOSED
        if not binary and not _is_utf8(data):
            self.meter.errors.inc()
            return INVALID_UTF8
        write_message(self, data, binary, self.factory.outbox)
        return self._written()

    def deliver(self, data: bytes, binary: bool, shared: dict[str, Any]) -> str | None:
        if self.state != self.STATE_OPEN:
            self.meter.errors.inc()
            return CLOSED
        framed = shared.get("websocket")
        if framed is None:
            if not binary and not _is_utf8(data):
                self.meter.errors.inc()
                return INVALID_UTF8
            framed = shared["websocket"] = frame(data, binary)  # framed once per fan-out
        write_frame(self, framed, data, binary, self.factory.outbox)
        return self._written()

    def close_connection(self) -> None:
        self._close(CLOSE_NORMAL, "")

    def clear_buffer(self) -> str | None:
        raise RuntimeError("clear_buffer is only available on socket servers")


class ClientWebSocketFactory(ProtocolServerFactory, WebSocketServerFactory):
    """Everything the connections of one ``protocol: websocket`` server share."""

    # Autobahn derives from the unparameterised twisted ServerFactory, whose ``protocol`` must
    # build a protocol typed with that base factory; ours are typed with their own factory class.
    protocol = ClientWebSocketProtocol  # type: ignore[assignment]
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
        WebSocketServerFactory.__init__(self, server="connmix")
        self._batched_timer = ExactTimer(clock)
        self.share(script, connections, ids, clock, meter if meter is not None else NULL_METER,
                   config.read_timeout)
        self.reconfigure(config)

    def reconfigure(self, config: ServerConfig) -> None:
        """Use ``config``'s "new conns" keys for the connections accepted from now on."""
        self.config = config
        self.path = config.option("path") or "/"
        self.origins = origin_patterns(config.option("origins"))
        self.renew_wheel(config.read_timeout)
        self.setProtocolOptions(autoPingInterval=0,
                                **websocket_options(config.max_message_size, config.compression))
