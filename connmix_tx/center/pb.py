"""The registry's Perspective Broker face (SPEC 8.1): portal, realm, checker, engine avatars.

Engines log in as ``engine`` with ``cluster.secret`` and pass a mind (a ``Referenceable``) that
receives node lists.  The avatar offers ``register`` and ``heartbeat``; logging out (the PB
connection closing) marks the engine down.  The same ``SecretChecker`` and ``LoopbackGuard``
serve the mesh point.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from connmix_tx.center.registry import Registry, RegistryError

log = Logger(namespace="connmix.registry")

ENGINE_USER = b"engine"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@implementer(ICredentialsChecker)
class SecretChecker:
    """Accepts any username (or only ``username``) with the cluster secret as password."""

    credentialInterfaces = (credentials.IUsernameHashedPassword, credentials.IUsernamePassword)

    def __init__(self, secret: str, username: bytes | None = None) -> None:
        self.secret = secret.encode()
        self.username = username

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        if self.username is not None and not hmac.compare_digest(creds.username, self.username):
            return defer.fail(error.UnauthorizedLogin("unknown user"))
        if creds.checkPassword(self.secret):
            return defer.succeed(creds.username)
        return defer.fail(error.UnauthorizedLogin("wrong cluster secret"))


class LoggingPortal(portal.Portal):
    """A portal that logs refused logins with the peer address (SPEC 10) and answers them with a
    plain ``pb.Error``, which PB passes to the client without logging a traceback here."""

    def __init__(self, realm: Any, checkers: Any, name: str) -> None:
        super().__init__(realm, checkers)
        self.name = name

    def login(self, creds: Any, mind: Any, *interfaces: Any) -> defer.Deferred:
        def refused(failure: Any) -> Any:
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            transport = getattr(getattr(creds, "broker", None), "transport", None)
            peer = getattr(transport.getPeer(), "host", "?") if transport is not None else "?"
            log.warn("{name}: refused login from {peer}: {reason}", name=self.name, peer=peer,
                     reason=failure.getErrorMessage())
            raise pb.Error(f"login refused: {failure.getErrorMessage()}")

        return super().login(creds, mind, *interfaces).addErrback(refused)


class GuardedPBServerFactory(pb.PBServerFactory):
    """A PB server that, with an empty cluster secret, talks to loopback peers only (SPEC 10)."""

    noisy = False

    def __init__(self, root: Any, secret: str, name: str) -> None:
        super().__init__(root)
        self.open_to_all = bool(secret)
        self.name = name

    def buildProtocol(self, addr: Any) -> pb.Broker | None:
        host = getattr(addr, "host", "")
        if not self.open_to_all and not is_loopback(host):
            log.warn(
                "{name}: refused login from {peer}: cluster.secret is empty, loopback peers only",
                name=self.name,
                peer=host,
            )
            return None
        return super().buildProtocol(addr)


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
