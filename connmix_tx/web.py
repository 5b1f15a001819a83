"""Small Twisted Web pieces shared by the engine API and the center API (docs/api.md).

Both HTTP listeners answer in the JSON envelope ``{"E": error, "r": result}``: unknown paths are
404 with code -32601, a wrong method on a known path is 405, and no per-request access log line is
written (nothing per message at info level: docs/operations.md, "Logging").

``QuietSite(max_body=...)`` caps request bodies before they are read: a ``Content-Length`` above
the cap, or a streamed (chunked) body that grows past it, is answered ``413`` and the connection
closed at once, before any resource (the access guard included) sees the request, so nothing is
spooled to memory or to a temporary file.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

NOT_FOUND_BODY = b'{"E":{"c":-32601,"m":"not found"},"r":null}'
METHOD_NOT_ALLOWED_BODY = b'{"E":{"c":-32601,"m":"method not allowed"},"r":null}'
TOO_LARGE_BODY = b'{"E":{"c":-32600,"m":"request too large"},"r":null}'
TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TOO_LARGE_BODY), TOO_LARGE_BODY)
)
log = Logger(namespace="connmix.web")
#: The body cap of a ``QuietSite`` not given one.
DEFAULT_MAX_BODY = 1 << 20


def json_response(request: Request, status: int, body: bytes) -> bytes:
    """Set the status and JSON content type; return ``body`` for ``render``."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


class NotFound(Resource):
    """404 with the JSON error envelope."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return json_response(request, 404, NOT_FOUND_BODY)


class JsonTree(Resource):
    """A node of the URL tree whose unknown children (and itself) are JSON 404s."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes:
        return json_response(request, 404, NOT_FOUND_BODY)


def method_not_allowed(request: Request, allow: bytes) -> bytes:
    """The 405 answer (JSON body, ``Allow`` header) to a request of a method the resource does
    not serve."""
    request.setHeader(b"allow", allow)
    return json_response(request, 405, METHOD_NOT_ALLOWED_BODY)


class JsonGet(Resource):
    """A leaf that answers GET with the JSON of ``produce()``; other methods get 405."""

    isLeaf = True

    def __init__(self, produce: Callable[[], Any]) -> None:
        super().__init__()
        self.produce = produce

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, b"GET")
        body = json.dumps(self.produce(), separators=(",", ":")).encode()
        return json_response(request, 200, body)


class LimitedRequest(Request):
    """A request whose body is refused with 413 once it is known to exceed the site's cap."""

    _received = 0
    _refused = False

    def _cap(self) -> int | None:
        # Site.buildProtocol sets channel.site; Twisted's HTTPChannel does not declare it.
        cap = getattr(self.channel.site, "max_body", None)  # type: ignore[attr-defined]
        return cap() if callable(cap) else cap

    def gotLength(self, length: int | None) -> None:
        cap = self._cap()
        if cap is not None and length is not None and length > cap:
            self._refuse(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        cap = self._cap()
        if cap is not None and self._received > cap:
            self._refuse(self._received)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self, size: int) -> None:
        """413 and close, without reading (or keeping) more of the body."""
        self._refused = True
        self.content = _Discard()
        # No "100 Continue" after the refusal (the channel sends it after gotLength).
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        transport = channel.transport
        log.info("refuse http request from {peer}: body of {size} bytes or more over {cap}",
                 peer=_peer(transport), size=size, cap=self._cap())
        if transport is not None:
            transport.write(TOO_LARGE_RESPONSE)
            channel.loseConnection()


class _Discard:
    """The content file of a refused request: takes nothing."""

    def write(self, data: bytes) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return b""

    def seek(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _peer(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:  # noqa: BLE001 - a log field only
        return "-"


class QuietSite(Site):
    """A Site without Twisted's per-request access log line and without tracebacks in pages.

    ``max_body`` (an int, or a callable read per request; None: no cap) bounds request bodies;
    the default suits listeners that take no bodies at all (the center API).
    """

    displayTracebacks = False
    noisy = False
    requestFactory = LimitedRequest

    def __init__(self, resource: Resource, *args: Any,
                 max_body: int | Callable[[], int] | None = DEFAULT_MAX_BODY,
                 **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.max_body = max_body

    def log(self, request: http.Request) -> None:
        pass
