"""The engine API listener (SPEC 7): a Twisted Web ``Site`` with the WebSocket API on ``/ws/v1``.

``ApiWebSocketProtocol`` is thin: each text or binary message goes to ``ApiDispatcher.handle``;
replies are written in request order even when some of them wait for another engine; queue
events are written as the queues deliver them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Site

from connmix_tx.config import ApiServerConfig
from connmix_tx.engine.api import ApiDispatcher, ApiSession
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.websocket import peer_address
from connmix_tx.web import JsonTree, QuietSite


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

    def onOpen(self) -> None:
        self.peer_text = peer_address(self.transport)
        self.session = ApiSession(self._write, self._buffered, self.factory.node_id, self.peer_text)
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

    def shutdown(self) -> None:
        for proto in list(self.open_protocols):
            if proto.state == proto.STATE_OPEN:
                proto.sendCloseFrame(1001, b"server stopping", isReply=False)


def api_site(factory: ApiWebSocketFactory) -> Site:
    """The Site served on ``engine.apiServer``: ``/ws/v1`` and JSON 404s."""
    root = JsonTree()
    ws = JsonTree()
    ws.putChild(b"v1", WebSocketResource(factory))
    root.putChild(b"ws", ws)
    return QuietSite(root)
