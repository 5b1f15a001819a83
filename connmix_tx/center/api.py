"""The center's HTTP API (docs/api.md, "The center API"): ``GET /version``, ``GET /v1/nodes`` and
``GET /metrics``, behind access control."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Site

from connmix_tx.auth import AccessControl, AccessGuard
from connmix_tx.center.registry import Registry
from connmix_tx.config import ListenerConfig
from connmix_tx.web import JsonGet, JsonTree, QuietSite


def center_site(
    registry: Registry, access: AccessControl, listener: ListenerConfig, metrics: Resource | None = None
) -> Site:
    """The Site served on ``center.apiServer`` (``listener``); every path needs the read role.

    ``metrics`` is the ``GET /metrics`` resource (the center's Prometheus registry), when given.
    """
    root = JsonTree()
    root.putChild(b"version", JsonGet(lambda: {"apis": ["v1"]}))
    v1 = JsonTree()
    v1.putChild(b"nodes", JsonGet(lambda: {"nodes": registry.describe()}))
    root.putChild(b"v1", v1)
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    access.add_listener("center api", listener.bind, listener.port)
    return QuietSite(AccessGuard(root, access))
