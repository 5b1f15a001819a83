"""The registry's Perspective Broker face: the realm and the engine avatars behind ``center.registry``.

Engines log in as ``ENGINE_USER`` with ``cluster.secret`` and pass a mind (a ``Referenceable``)
that receives node lists.  The avatar offers ``register`` and ``heartbeat``; logging out (the PB
connection closing) marks the engine down.  The checker, portal and guarded factory are shared
with the mesh point and live in ``connmix_tx.pb``.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import portal
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from connmix_tx.center.registry import Registry, RegistryError
from connmix_tx.pb import ENGINE_USER, GuardedPBServerFactory, LoggingPortal, SecretChecker

log = Logger(namespace="connmix.registry")


class EngineAvatar(pb.Avatar):
    """One logged-in engine connection."""

    def __init__(self, center: "RegistryRealm", mind: Any) -> None:
        self.center = center
        self.mind = mind
        self.node_id: str | None = None
        self.peer_host = ""

    def perspective_register(self, node_id: str, info: dict[str, Any]) -> dict[str, Any]:
        try:
            record = self.center.registry.register(str(node_id), dict(info), self.peer_host, self.mind)
        except RegistryError as e:
            raise pb.Error(str(e)) from None
        self.node_id = record.node_id
        return {"number": record.number, "nodes": self.center.registry.describe()}

    def perspective_heartbeat(self, stats: dict[str, Any]) -> bool:
        if self.node_id is None:
            return False
        return self.center.registry.heartbeat(self.node_id, dict(stats))

    def logout(self) -> None:
        if self.node_id is not None:
            self.center.registry.drop(self.node_id, "connection lost", self.mind)


@implementer(portal.IRealm)
class RegistryRealm:
    """Makes an ``EngineAvatar`` per login and pushes node lists to every engine on change."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        registry.on_change = self.push_nodes

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("PB only")
        avatar = EngineAvatar(self, mind)
        broker = getattr(mind, "broker", None)
        transport = getattr(broker, "transport", None)
        if transport is not None:
            avatar.peer_host = getattr(transport.getPeer(), "host", "")
        return pb.IPerspective, avatar, avatar.logout

    def push_nodes(self) -> None:
        nodes = self.registry.describe()
        for record in self.registry.nodes():
            if record.mind is not None:
                record.mind.callRemote("nodes", nodes).addErrback(
                    lambda f, n=record.node_id: log.debug(
                        "node list push to {node_id} failed: {error}", node_id=n, error=f.getErrorMessage()
                    )
                )


def registry_factory(registry: Registry, secret: str) -> pb.PBServerFactory:
    """The PB factory served on ``center.registry``."""
    checker = SecretChecker(secret, ENGINE_USER)
    realm = LoggingPortal(RegistryRealm(registry), [checker], "registry")
    return GuardedPBServerFactory(realm, secret, "registry")
