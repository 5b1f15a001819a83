"""Client side of our PB connections (engine -> center registry, engine -> engine mesh point).

``ClientService`` keeps the TCP connection up (back-off 1 s -> 30 s); ``BrokerFactory`` calls
``on_ready(broker)`` once Banana has negotiated (PB's own ``clientConnectionMade`` hook), and the
link logs in from there.  Logging in outside ``ClientService.prepareConnection`` keeps the
service's state machine out of it: a refused login or a stop during login is just a connection
that closes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol
from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure
from twisted.spread import pb

_REFUSALS = (b"twisted.cred.error.UnauthorizedLogin", b"twisted.spread.pb.Error")


def retry_delay(failed_attempts: int) -> float:
    """Back-off 1 s -> 30 s between connection attempts (SPEC 8.2)."""
    return min(30.0, 2.0 ** max(0, failed_attempts - 1))


class BrokerFactory(protocol.ClientFactory):
    """Builds client brokers and reports each one once it can make remote calls."""

    protocol = pb.Broker
    noisy = False

    def __init__(self, on_ready: Callable[[pb.Broker], None]) -> None:
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
