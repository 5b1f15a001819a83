"""The center's HTTP API (SPEC 9): ``GET /version`` and ``GET /v1/nodes``."""

from __future__ import annotations

from twisted.web.server import Site

from connmix_tx.center.registry import Registry
from connmix_tx.web import JsonGet, JsonTree, QuietSite


def center_site(registry: Registry) -> Site:
    """The Site served on ``center.apiServer``."""
    root = JsonTree()
    root.putChild(b"version", JsonGet(lambda: {"apis": ["v1"]}))
    v1 = JsonTree()
    v1.putChild(b"nodes", JsonGet(lambda: {"nodes": registry.describe()}))
    root.putChild(b"v1", v1)
    return QuietSite(root)
