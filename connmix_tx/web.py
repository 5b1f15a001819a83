"""Small Twisted Web pieces shared by the engine API and the center API (SPEC 7, 9).

Both HTTP listeners answer in the JSON envelope ``{"E": error, "r": result}``: unknown paths are
404 with code -32601, a wrong method on a known path is 405, and no per-request access log line is
written (SPEC 11: nothing per message at info level).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

NOT_FOUND_BODY = b'{"E":{"c":-32601,"m":"not found"},"r":null}'
METHOD_NOT_ALLOWED_BODY = b'{"E":{"c":-32601,"m":"method not allowed"},"r":null}'


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


class JsonGet(Resource):
    """A leaf that answers GET with the JSON of ``produce()``; other methods get 405."""

    isLeaf = True

    def __init__(self, produce: Callable[[], Any]) -> None:
        super().__init__()
        self.produce = produce

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET")
            return json_response(request, 405, METHOD_NOT_ALLOWED_BODY)
        body = json.dumps(self.produce(), separators=(",", ":")).encode()
        return json_response(request, 200, body)


class QuietSite(Site):
    """A Site without Twisted's per-request access log line and without tracebacks in pages."""

    displayTracebacks = False
    noisy = False

    def log(self, request: Request) -> None:
        pass
