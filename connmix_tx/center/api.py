"""The center's HTTP API (SPEC 9): ``GET /version`` and ``GET /v1/nodes``, behind access control."""

from __future__ import annotations

from twisted.web.server import Site

from connmix_tx.auth import AccessControl, AccessGuard
from connmix_tx.center.registry import Registry
from connmix_tx.config import ListenerConfig
from connmix_tx.web import JsonGet, JsonTree, QuietSite


def center_site(registry: Registry, access: AccessControl, listener: ListenerConfig) -> Site:
    """The Site served on ``center.apiServer`` (``listener``); every path needs the read role."""
    root = JsonTree()
    root.putChild(b"version", JsonGet(lambda: {"apis": ["v1"]}))
    v1 = JsonTree()
    v1.putChild(b"nodes", JsonGet(lambda: {"nodes": registry.describe()}))
    root.putChild(b"v1", v1)
    access.add_listener("center api", listener.bind, listener.port)
    return QuietSite(AccessGuard(root, access))
