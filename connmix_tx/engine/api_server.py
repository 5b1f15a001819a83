"""The engine API listener (docs/api.md): a Twisted Web ``Site`` with the WebSocket API on
``/ws/v1`` and the HTTP API on ``/v1/mesh/send`` and ``/v1/mesh/publish``, behind ``AccessGuard``.

``ApiWebSocketProtocol`` is thin: the text or binary messages of one read go together to
``ApiDispatcher.handle_many`` (forwarded sends of one read leave as one submission per link);
replies are written in request order even when some of them wait for another engine, the ready
ones of a read in one write; queue events are written as the queues deliver them.  ``HttpApiMethod`` runs one dispatcher method per
POST, in the compact dialect, and maps its errors to HTTP statuses (docs/api.md, "The HTTP API").
``GET /metrics`` serves the engine's Prometheus registry (docs/operations.md, Metrics),
``GET /console`` the debug console page (``connmix_tx.console``).

Limits (docs/api.md, "Connection limits and close codes"): a WebSocket message above
``maxMessageSize`` closes with 1009 (Autobahn), an HTTP body above it gets 413; an API connection
with more than ``maxWriteBuffer`` bytes queued is closed with 4008, one whose queue does not move
for ``writeTimeout`` seconds is aborted; an HTTP request idle for ``readTimeout`` seconds is dropped
(a WebSocket gets auto-pings instead).  These are "new conns" keys:
``ApiWebSocketFactory.reconfigure`` applies them to later connections.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connmix_tx.auth import UNAUTHORIZED, AccessGuard, request_user
from connmix_tx.config import ApiServerConfig
from connmix_tx.console import ConsolePage
from connmix_tx.engine.api import ApiDispatcher, ApiSession
from connmix_tx.engine.api_wire import COMPACT, INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR, ApiError, strict_loads
from connmix_tx.engine.frames import direct, frame, write_message
from connmix_tx.engine.outbound import WriteWatch, buffered_bytes, pause_reading
from connmix_tx.engine.queue import QueueManager
from connmix_tx.meter import NULL_METER, ApiServerMeter
from connmix_tx.engine.connections import peer_address
from connmix_tx.engine.ws_settings import CLOSE_SLOW, WRITE_TIMEOUT, ExactTimer, end_message, websocket_options
from connmix_tx.later import now_or_later
from connmix_tx.reactors import IStreamTransport, global_reactor
from connmix_tx.web import JsonTree, QuietSite, json_response, method_not_allowed

__all__ = ["ApiWebSocketFactory", "ApiWebSocketProtocol", "HttpApiMethod", "api_site", "buffered_bytes"]

log = Logger(namespace="connmix.api")


class ApiWebSocketProtocol(WebSocketServerProtocol):
    """One back-end connection to ``/ws/v1``."""

    factory: "ApiWebSocketFactory"
    #: Set once the connection is made; a connected stream (write, abort, pause reading).
    transport: IStreamTransport
    session: ApiSession | None = None
    #: The user name the handshake was admitted as (set by the factory; docs/api.md, "Users").
    user: str | None = None
    write_timeout = 0
    max_write_buffer = 0
    _slow = False
    #: Requests of the read being processed (None outside ``dataReceived``).
    _read: list | None = None

    def connectionMade(self) -> None:
        limits = self.factory.config
        self.write_timeout, self.max_write_buffer = limits.write_timeout, limits.max_write_buffer
        super().connectionMade()

    def onOpen(self) -> None:
        self.peer_text = peer_address(self.transport)
        factory = self.factory
        self.session = ApiSession(self._write, self._buffered, factory.node_id, self.peer_text,
                                  user=self.user, meter=factory.meter)
        self._replies: deque[list] = deque()
        factory.open_protocols.add(self)

    def dataReceived(self, data: bytes) -> None:
        """Collect the requests of this read and answer them together (docs/performance.md)."""
        if self._read is not None:  # re-entered: nothing to add
            super().dataReceived(data)
            return
        self._read = []
        try:
            super().dataReceived(data)
        finally:
            self._answer_read()

    def _answer_read(self) -> None:
        read, self._read = self._read, None
        if read:
            self._dispatch(read)

    def onMessageEnd(self) -> None:
        end_message(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._read is not None:
            self._read.append(payload)
        else:
            self._dispatch([payload])

    def sendCloseFrame(self, *args: Any, **kwargs: Any) -> None:
        # Requests that arrived before the close (in the same read) are answered before it.
        if self._read:
            self._answer_read()
            self._read = []
        super().sendCloseFrame(*args, **kwargs)

    def _dispatch(self, requests: list[bytes]) -> None:
        assert self.session is not None
        replies, waiting = self.factory.dispatcher.handle_many(self.session, requests)
        if waiting is None and not self._replies:
            self._write_all(replies)
            return
        # [replies, all filled, how many of them were written already]
        slot: list = [replies, waiting is None, 0]
        self._replies.append(slot)
        if waiting is None:
            self._fill(replies, slot)
            return
        if self._replies[0] is slot:  # first in line: write the replies that are ready now
            ready = 0
            while ready < len(replies) and replies[ready] is not None:
                ready += 1
            if ready:
                slot[2] = ready
                self._write_all(replies[:ready])
        waiting.addCallback(self._fill, slot)

    def _fill(self, replies: list, slot: list) -> None:
        slot[1] = True
        while self._replies and self._replies[0][1]:
            replies, _, written = self._replies.popleft()
            self._write_all(replies[written:] if written else replies)

    def _write_all(self, replies: list[bytes]) -> None:
        """Send several messages, in as few writes as the outbound limit allows; then the checks
        of ``_write``.  A write never takes the buffer past ``maxWriteBuffer`` by more than its
        last message, as ``_write`` does message by message."""
        if len(replies) == 1:
            self._write(replies[0])
            return
        if not direct(self):
            for reply in replies:
                self._write(reply)
            return
        start = 0
        while start < len(replies) and self.state == self.STATE_OPEN:
            room = self.max_write_buffer - buffered_bytes(self.transport)
            frames, size = [], 0
            for reply in replies[start:]:
                framed = frame(reply)
                frames.append(framed)
                size += len(framed)
                if size > room:
                    break
            start += len(frames)
            self.transport.write(b"".join(frames))
            self._written()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.open_protocols.discard(self)
        self.factory.write_watch.forget(self)
        if self.session is not None:
            self.factory.queues.unconsume(self.session)

    def _write(self, data: bytes) -> None:
        """Send one message; then the slow-consumer check and the write watch (docs/api.md,
        "Connection limits and close codes")."""
        if self.state != self.STATE_OPEN:
            return
        write_message(self, data)
        self._written()

    def _written(self) -> None:
        buffered = buffered_bytes(self.transport)
        if buffered > self.max_write_buffer:
            self.close_slow(buffered)
        elif buffered and self.write_timeout:
            self.factory.write_watch.written(self)

    def onPing(self, payload: bytes) -> None:
        """Autobahn's automatic pong counts against maxWriteBuffer / writeTimeout like a reply."""
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)
            buffered = buffered_bytes(self.transport)
            if buffered > self.max_write_buffer:
                self.close_slow(buffered)
            elif buffered and self.write_timeout:
                self.factory.write_watch.written(self)

    def close_slow(self, buffered: int) -> None:
        """Close with 4008; Autobahn's 1 s close-handshake timeout aborts a peer that never reads."""
        if self._slow:
            return
        self._slow = True
        log.warn("close slow api connection {peer} buffered={bytes}", peer=self.peer_text, bytes=buffered)
        self.factory.meter.slow_api.inc()
        if self.session is not None:
            self.factory.queues.unconsume(self.session)  # stop feeding it events at once
        # Read nothing more (requests, pings) from a peer that takes nothing.
        pause_reading(self.transport)
        self.sendCloseFrame(CLOSE_SLOW, b"slow consumer", isReply=False)

    def write_timed_out(self) -> None:
        """Nothing queued for this connection was taken for ``writeTimeout`` seconds: abort."""
        log.debug("api connection {peer}: {reason}", peer=self.peer_text, reason=WRITE_TIMEOUT)
        self.dropConnection(abort=True)

    def close_removed_user(self) -> None:
        """Its user was removed from ``access.users`` (SIGHUP): close with 4001."""
        self.close_with(4001, b"user removed")

    def close_with(self, code: int, reason: bytes) -> None:
        """Start a close handshake; the queues stop feeding this connection first, so no
        message is handed to a connection that can no longer write it (docs/queues.md)."""
        if self.session is not None:
            self.factory.queues.unconsume(self.session)
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code, reason, isReply=False)

    def _buffered(self) -> int:
        return buffered_bytes(self.transport)


class ApiWebSocketFactory(WebSocketServerFactory):
    """Shared state of the ``/ws/v1`` connections."""

    # Autobahn derives from the unparameterised twisted ServerFactory, whose ``protocol`` must
    # build a protocol typed with that base factory; ours are typed with their own factory class.
    protocol = ApiWebSocketProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        config: ApiServerConfig,
        dispatcher: ApiDispatcher,
        queues: QueueManager,
        node_id: str,
        meter: ApiServerMeter = NULL_METER,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(server="connmix")
        self.dispatcher = dispatcher
        self.queues = queues
        self.node_id = node_id
        self.meter = meter
        clock = clock if clock is not None else global_reactor()
        self._batched_timer = ExactTimer(clock)
        self.write_watch = WriteWatch(clock)
        self.open_protocols: set[ApiWebSocketProtocol] = set()
        #: The Site serving this factory (set by ``api_site``): its HTTP timeout follows readTimeout.
        self.site: Site | None = None
        self._handshake_user: str | None = None
        self.reconfigure(config)

    def reconfigure(self, config: ApiServerConfig) -> None:
        """Use ``config``'s "new conns" keys for the connections and requests accepted from now on."""
        self.config = config
        # Autobahn's timers are batched in whole seconds (txaio truncates the deadline), so
        # a ping interval or timeout below 1 s could fire at once: at least 1 s each.
        half = max(1.0, config.read_timeout / 2) if config.read_timeout else 0
        self.setProtocolOptions(
            autoPingInterval=half,
            autoPingTimeout=half,
            autoPingRestartOnAnyTraffic=True,
            **websocket_options(config.max_message_size, False),
        )
        if self.site is not None:
            self.site.timeOut = config.read_timeout or None

    # The same unparameterised base: it returns the base protocol type, ours is narrower.
    def buildProtocol(self, addr: IAddress) -> ApiWebSocketProtocol:  # type: ignore[override]
        proto = cast(ApiWebSocketProtocol, super().buildProtocol(addr))
        proto.user = self._handshake_user
        return proto

    @contextmanager
    def admitted(self, user: str | None) -> Iterator[None]:
        """Around ``WebSocketResource.render``: the protocol it builds belongs to ``user``.

        That render builds the protocol synchronously and offers no way to hand it anything
        from the request, so the factory holds the user for exactly that call.
        """
        self._handshake_user = user
        try:
            yield
        finally:
            self._handshake_user = None

    def shutdown(self) -> None:
        for proto in list(self.open_protocols):
            proto.close_with(1001, b"server stopping")
        self.write_watch.stop()

    def users_replaced(self) -> None:
        """``access.users`` changed: close the connections whose user no longer exists (4001)."""
        access = self.dispatcher.access
        if access is None:
            return
        names = {user.username for user in access.config.users}
        for proto in list(self.open_protocols):
            if proto.user is not None and proto.user not in names:
                proto.close_removed_user()


class ApiWebSocketResource(WebSocketResource):
    """``/ws/v1``: Autobahn's resource, with the user ``AccessGuard`` admitted passed on."""

    def __init__(self, factory: ApiWebSocketFactory) -> None:
        super().__init__(factory)
        self.api_factory = factory

    def render(self, request: Request) -> Any:
        channel = request.channel
        with self.api_factory.admitted(request_user(request)):
            result = super().render(request)
        if request.channel is channel and channel.transport is None:
            # Upgraded: the WebSocket owns the connection now; the HTTP request timeout
            # (readTimeout) must not fire on it later.
            channel.setTimeout(None)
        return result


#: HTTP status of an API error code on the HTTP API; the others (101, 401...) are 200 (docs/api.md,
#: "The HTTP API").
HTTP_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, UNAUTHORIZED: 403, INTERNAL_ERROR: 500}


class HttpApiMethod(Resource):
    """``POST /v1/mesh/<name>``: one API method, compact body in, ``{"E", "r"}`` out (docs/api.md,
    "The HTTP API")."""

    isLeaf = True

    def __init__(
        self, dispatcher: ApiDispatcher, method: str, node_id: str, max_size: int | Any
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.method = method
        self.node_id = node_id
        #: The body size cap, or a callable returning it (the factory's current maxMessageSize).
        self.max_size = max_size

    def render(self, request: Request) -> Any:
        if request.method != b"POST":
            return method_not_allowed(request, b"POST")
        max_size = self.max_size() if callable(self.max_size) else self.max_size
        body = request.content.read(max_size + 1) if request.content is not None else b""
        if len(body) > max_size:
            return self._refused(request, ApiError(INVALID_REQUEST, "request too large"), 413)
        try:
            spec = strict_loads(body)
        except (ValueError, RecursionError):
            return self._refused(request, ApiError(PARSE_ERROR, "parse error: invalid JSON"))
        if not isinstance(spec, dict):
            return self._refused(request, ApiError(PARSE_ERROR, "parse error: the body is a JSON object"))
        peer = peer_address(request.channel)
        session = ApiSession(_discard, lambda: 0, self.node_id, peer, user=request_user(request))
        try:
            result = self.dispatcher.call(session, COMPACT, self.method, spec)
        except ApiError as e:
            return self._error(request, e)
        return now_or_later(
            result,
            lambda value: json_response(request, 200, COMPACT.envelope(value)),
            lambda later: self._answer_later(request, later),
        )

    def _answer_later(self, request: Request, later: Deferred) -> Any:
        """Write the reply once the result comes (unless the client went away first)."""
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def reply(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        later.addCallbacks(
            lambda value: json_response(request, 200, COMPACT.envelope(value)),
            lambda failure: self._error(request, failure.value),
        ).addCallback(reply)
        return NOT_DONE_YET

    def _error(self, request: Request, error: ApiError, status: int | None = None) -> bytes:
        status = status or HTTP_STATUS.get(error.code, 200)
        return json_response(request, status, COMPACT.envelope_error(error.code, error.message))

    def _refused(self, request: Request, error: ApiError, status: int | None = None) -> bytes:
        """An error before the method ran: counted here (the dispatcher never saw it)."""
        count = getattr(self.dispatcher, "count", None)
        if count is not None:
            count(self.method, error.code)
        return self._error(request, error, status)


def _discard(data: bytes) -> None:
    """An HTTP request consumes nothing, so nothing is ever written to its session."""


def api_site(factory: ApiWebSocketFactory, metrics: Resource | None = None) -> Site:
    """The Site served on ``engine.apiServer``: ``/ws/v1``, ``/v1/mesh/*``, ``/metrics`` (when
    ``metrics`` is given), the debug console page ``/console`` and JSON 404s.

    Every path is behind ``AccessGuard`` with the dispatcher's ``AccessControl``; a dispatcher
    without one (tests, tools) gets no guard.  HTTP requests time out after ``readTimeout``.
    """
    config, dispatcher = factory.config, factory.dispatcher
    root = JsonTree()
    ws = JsonTree()
    ws.putChild(b"v1", ApiWebSocketResource(factory))
    root.putChild(b"ws", ws)
    v1, mesh = JsonTree(), JsonTree()
    for name in (b"send", b"publish"):
        max_size = lambda: factory.config.max_message_size  # noqa: E731 - read per request
        mesh.putChild(name, HttpApiMethod(dispatcher, "mesh." + name.decode(), factory.node_id, max_size))
    v1.putChild(b"mesh", mesh)
    root.putChild(b"v1", v1)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    root.putChild(b"console", ConsolePage())
    # Bodies above maxMessageSize are refused (413) before they are read or authenticated.
    max_body = lambda: factory.config.max_message_size  # noqa: E731 - read per request
    if dispatcher.access is None:
        site = QuietSite(root, timeout=config.read_timeout or None, max_body=max_body)
    else:
        dispatcher.access.add_listener("api", config.bind, config.port)
        guarded = AccessGuard(root, dispatcher.access, query_paths=[b"/ws/v1"])
        site = QuietSite(guarded, timeout=config.read_timeout or None, max_body=max_body)
    factory.site = site
    return site
