"""The Perspective Broker pieces both roles use: the center's registry and the engines' mesh points.

Server side: ``SecretChecker`` (the ``cluster.secret`` as password), ``LoggingPortal`` (refused
logins logged with the peer address and answered with a plain ``pb.Error``) and
``GuardedPBServerFactory`` (with an empty secret, loopback peers only).  The registry's own realm
and factory live in ``connmix_tx.center.pb``, the mesh point's in ``connmix_tx.engine.mesh``.

Client side (engine -> center registry, engine -> engine mesh point): ``ClientService`` keeps the
TCP connection up (``retry_delay``: back-off 1 s -> 30 s); ``BrokerFactory`` calls
``on_ready(broker)`` once Banana has negotiated (PB's own ``clientConnectionMade`` hook), and the
link logs in from there with ``login``.  Logging in outside ``ClientService.prepareConnection``
keeps the service's state machine out of it: a refused login or a stop during login is just a
connection that closes.  ``is_refusal`` and ``reason_text`` read the failures.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from connmix_tx.auth import is_loopback

__all__ = [
    "ENGINE_USER", "BrokerFactory", "GuardedPBServerFactory", "LoggingPortal", "SecretChecker",
    "is_refusal", "login", "reason_text", "retry_delay",
]

log = Logger(namespace="connmix.registry")

#: The user name engines log in to the center registry with.
ENGINE_USER = b"engine"

_REFUSALS = (b"twisted.cred.error.UnauthorizedLogin", b"twisted.spread.pb.Error")


# --------------------------------------------------------------------------- server side


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
    """A portal that logs refused logins with the peer address and answers them with a
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
    """A PB server that, with an empty cluster secret, talks to loopback peers only
    (docs/configuration.md, ``cluster.secret``)."""

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


# --------------------------------------------------------------------------- client side


def retry_delay(failed_attempts: int) -> float:
    """Back-off 1 s -> 30 s between connection attempts (docs/operations.md, "The cluster")."""
    return min(30.0, 2.0 ** max(0, failed_attempts - 1))


class BrokerFactory(protocol.ClientFactory):
    """Builds client brokers and reports each one once it can make remote calls."""

    # Twisted does not type pb.Broker as a protocol with a factory (its Factory's bound).
    protocol = pb.Broker  # type: ignore[assignment]
    noisy = False

    def __init__(self, on_ready: Callable[[pb.Broker], object]) -> None:
        self.on_ready = on_ready

    def clientConnectionMade(self, broker: pb.Broker) -> None:
        self.on_ready(broker)


@inlineCallbacks
def login(broker: pb.Broker, username: bytes, password: bytes, mind: Any = None) -> Any:
    """PB challenge-response login over a ready broker; fires with the avatar reference."""
    root = broker.remoteForName("root")
    challenge, challenger = yield root.callRemote("login", username)
    avatar = yield challenger.callRemote("respond", pb.respond(challenge, password), mind)
    return avatar


def is_refusal(failure: Failure) -> bool:
    """True when the peer answered no (bad secret, registration refused), not a lost link."""
    value = failure.value
    if isinstance(value, pb.RemoteError):
        return value.remoteType in _REFUSALS
    return failure.check(UnauthorizedLogin, pb.Error) is not None


def reason_text(failure: Failure) -> str:
    """A short human reason for a failed connection, login or call."""
    value = failure.value
    if isinstance(value, pb.RemoteError) and value.remoteType == _REFUSALS[0]:
        return "login refused (cluster.secret)"
    if failure.check(UnauthorizedLogin) or "login refused" in failure.getErrorMessage():
        return "login refused (cluster.secret)"
    name = type(value).__name__
    if "ConnectionRefused" in name:
        return "connection refused"
    if isinstance(value, pb.RemoteError):
        return str(value.args[0]) if value.args else name
    return failure.getErrorMessage() or name
