"""The debug console (issue 7): one self-contained HTML page served at ``GET /console`` of the
engine API site.

The page (``index.html`` beside this file, shipped as package data) holds its CSS and JavaScript
inline and loads nothing from anywhere; in the browser it opens a WebSocket to a protocol server
and one to ``/ws/v1`` of the same origin, so a developer can click through the seed walkthrough
(README.md, "The walkthrough").  It is served behind the same ``AccessGuard`` as every other path of
the site; its ``Content-Security-Policy`` lets it run only its own inline code and connect only to
WebSockets.
"""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import Resource
from twisted.web.server import Request

from connmix_tx.web import NOT_FOUND_BODY, json_response, method_not_allowed

__all__ = ["ConsolePage", "page"]

#: No external asset can load even by mistake; WebSockets to any host (the protocol server is
#: usually on another port); never framed by another site.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page() -> bytes:
    """The console page as shipped (``connmix_tx/console/index.html``)."""
    return resources.files(__name__).joinpath("index.html").read_bytes()


class ConsolePage(Resource):
    """``/console`` (and ``/console/``): GET or HEAD the page; other methods 405, deeper paths 404."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = page()

    def render(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return json_response(request, 404, NOT_FOUND_BODY)
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, b"GET, HEAD")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return self.body
