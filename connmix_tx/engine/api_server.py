"""The engine API listener (SPEC 7, 10): a Twisted Web ``Site`` with the WebSocket API on
``/ws/v1`` and the HTTP API on ``/v1/mesh/send`` and ``/v1/mesh/publish``, behind ``AccessGuard``.

``ApiWebSocketProtocol`` is thin: each text or binary message goes to ``ApiDispatcher.handle``;
replies are written in request order even when some of them wait for another engine; queue
events are written as the queues deliver them.  ``HttpApiMethod`` runs one dispatcher method per
POST, in the compact dialect, and maps its errors to HTTP statuses (SPEC 7.4).
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connmix_tx.auth import UNAUTHORIZED, AccessGuard, request_user
from connmix_tx.config import ApiServerConfig
from connmix_tx.engine.api import (
    COMPACT, INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR, ApiDispatcher, ApiError, ApiSession,
    strict_loads,
)
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.websocket import peer_address
from connmix_tx.web import METHOD_NOT_ALLOWED_BODY, JsonTree, QuietSite, json_response


log = Logger(namespace="connmix.api")

def buffered_bytes(transport: Any) -> int:
    """Bytes written to ``transport`` and not yet accepted by the kernel.

    Twisted has no public accessor; ``FileDescriptor`` keeps them in ``dataBuffer`` (from
    ``offset``) and ``_tempDataBuffer``.  Transports without those attributes report 0.
    """
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


class ApiWebSocketProtocol(WebSocketServerProtocol):
    """One back-end connection to ``/ws/v1``."""

    factory: "ApiWebSocketFactory"
    session: ApiSession | None = None
    #: The user name the handshake was admitted as (set by the factory, SPEC 10).
    user: str | None = None

    def onOpen(self) -> None:
        self.peer_text = peer_address(self.transport)
        self.session = ApiSession(
            self._write, self._buffered, self.factory.node_id, self.peer_text, user=self.user
        )
        self._replies: deque[list] = deque()
        self.factory.open_protocols.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self.session is not None
        reply = self.factory.dispatcher.handle(self.session, payload)
        if not isinstance(reply, Deferred) and not self._replies:
            self.sendMessage(reply)
            return
        slot: list = [None]
        self._replies.append(slot)
        if isinstance(reply, Deferred):
            reply.addCallback(self._fill, slot)
        else:
            self._fill(reply, slot)

    def _fill(self, reply: bytes, slot: list) -> None:
        slot[0] = reply
        while self._replies and self._replies[0][0] is not None:
            ready = self._replies.popleft()[0]
            if self.state == self.STATE_OPEN:
                self.sendMessage(ready)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.open_protocols.discard(self)
        if self.session is not None:
            self.factory.queues.unconsume(self.session)

    def _write(self, data: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(data)

    def _buffered(self) -> int:
        return buffered_bytes(self.transport)


class ApiWebSocketFactory(WebSocketServerFactory):
    """Shared state of the ``/ws/v1`` connections."""

    protocol = ApiWebSocketProtocol
    noisy = False

    def __init__(
        self, config: ApiServerConfig, dispatcher: ApiDispatcher, queues: QueueManager, node_id: str
    ) -> None:
        super().__init__(server="connmix")
        self.config = config
        self.dispatcher = dispatcher
        self.queues = queues
        self.node_id = node_id
        self.open_protocols: set[ApiWebSocketProtocol] = set()
        half = config.read_timeout / 2 if config.read_timeout else 0
        self.setProtocolOptions(
            maxFramePayloadSize=config.max_message_size,
            maxMessagePayloadSize=config.max_message_size,
            autoPingInterval=half,
            autoPingTimeout=half,
            autoPingRestartOnAnyTraffic=True,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            utf8validateIncoming=True,
            failByDrop=False,
            webStatus=False,
            trustXForwardedFor=0,
        )
        self._handshake_user: str | None = None

    def buildProtocol(self, addr: Any) -> ApiWebSocketProtocol:
        proto = super().buildProtocol(addr)
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
            if proto.state == proto.STATE_OPEN:
                proto.sendCloseFrame(1001, b"server stopping", isReply=False)


class ApiWebSocketResource(WebSocketResource):
    """``/ws/v1``: Autobahn's resource, with the user ``AccessGuard`` admitted passed on."""

    def __init__(self, factory: ApiWebSocketFactory) -> None:
        super().__init__(factory)
        self.api_factory = factory

    def render(self, request: Request) -> Any:
        with self.api_factory.admitted(request_user(request)):
            return super().render(request)


#: HTTP status of an API error code on the HTTP API; the others (101, 401...) are 200 (SPEC 7.4).
HTTP_STATUS = {PARSE_ERROR: 400, INVALID_REQUEST: 400, UNAUTHORIZED: 403, INTERNAL_ERROR: 500}


class HttpApiMethod(Resource):
    """``POST /v1/mesh/<name>``: one API method, compact body in, ``{"E", "r"}`` out (SPEC 7.4)."""

    isLeaf = True

    def __init__(self, dispatcher: ApiDispatcher, method: str, node_id: str, max_size: int) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.method = method
        self.node_id = node_id
        self.max_size = max_size

    def render(self, request: Request) -> Any:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return json_response(request, 405, METHOD_NOT_ALLOWED_BODY)
        body = request.content.read(self.max_size + 1) if request.content is not None else b""
        if len(body) > self.max_size:
            return self._error(request, ApiError(INVALID_REQUEST, "request too large"), 413)
        try:
            spec = strict_loads(body)
        except (ValueError, RecursionError):
            return self._error(request, ApiError(PARSE_ERROR, "parse error: invalid JSON"))
        if not isinstance(spec, dict):
            return self._error(request, ApiError(PARSE_ERROR, "parse error: the body is a JSON object"))
        peer = peer_address(request.channel)
        session = ApiSession(_discard, lambda: 0, self.node_id, peer, user=request_user(request))
        try:
            result = self.dispatcher.call(session, COMPACT, self.method, spec)
        except ApiError as e:
            return self._error(request, e)
        if not isinstance(result, Deferred):
            return json_response(request, 200, COMPACT.envelope(result))
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def reply(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        result.addCallbacks(
            lambda value: json_response(request, 200, COMPACT.envelope(value)),
            lambda failure: self._error(request, failure.value),
        ).addCallback(reply)
        return NOT_DONE_YET

    def _error(self, request: Request, error: ApiError, status: int | None = None) -> bytes:
        status = status or HTTP_STATUS.get(error.code, 200)
        return json_response(request, status, COMPACT.envelope_error(error.code, error.message))


def _discard(data: bytes) -> None:
    """An HTTP request consumes nothing, so nothing is ever written to its session."""


def api_site(factory: ApiWebSocketFactory) -> Site:
    """The Site served on ``engine.apiServer``: ``/ws/v1``, ``/v1/mesh/*`` and JSON 404s.

    Every path is behind ``AccessGuard`` with the dispatcher's ``AccessControl``; a dispatcher
    without one (tests, tools) gets no guard.
    """
    config, dispatcher = factory.config, factory.dispatcher
    root = JsonTree()
    ws = JsonTree()
    ws.putChild(b"v1", ApiWebSocketResource(factory))
    root.putChild(b"ws", ws)
    v1, mesh = JsonTree(), JsonTree()
    for name in (b"send", b"publish"):
        method = HttpApiMethod(dispatcher, "mesh." + name.decode(), factory.node_id, config.max_message_size)
        mesh.putChild(name, method)
    v1.putChild(b"mesh", mesh)
    root.putChild(b"v1", v1)
    if dispatcher.access is None:
        return QuietSite(root)
    dispatcher.access.add_listener("api", config.bind, config.port)
    return QuietSite(AccessGuard(root, dispatcher.access, query_paths=[b"/ws/v1"]))
