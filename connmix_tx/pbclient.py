"""Client side of our PB connections (engine -> center registry, engine -> engine mesh point).

``BrokerFactory`` builds brokers whose ``ready`` Deferred fires once Banana has negotiated (calls
made before that are garbage to the server); ``login`` does PB's challenge-response login over
such a broker.  Both links use ``ClientService`` with ``retry_delay`` for reconnection.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import protocol
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure
from twisted.spread import pb


def retry_delay(failed_attempts: int) -> float:
    """Back-off 1 s -> 30 s between connection attempts (SPEC 8.2)."""
    return min(30.0, 2.0 ** max(0, failed_attempts - 1))


class ReadyBroker(pb.Broker):
    """A client broker whose ``ready`` Deferred fires once Banana has negotiated its dialect."""

    def __init__(self) -> None:
        super().__init__(isClient=1)
        self.ready: Deferred = Deferred()

    def connectionReady(self) -> None:
        super().connectionReady()
        self.ready.callback(self)


class BrokerFactory(protocol.ClientFactory):
    protocol = ReadyBroker
    noisy = False

    def clientConnectionMade(self, broker: pb.Broker) -> None:
        pass  # ReadyBroker.ready does the work


@inlineCallbacks
def login(broker: Any, username: bytes, password: bytes, mind: Any = None) -> Any:
    """Log in over ``broker`` (once ready); fires with the avatar's remote reference."""
    yield broker.ready
    root = broker.remoteForName("root")
    challenge, challenger = yield root.callRemote("login", username)
    avatar = yield challenger.callRemote("respond", pb.respond(challenge, password), mind)
    return avatar


def is_refusal(failure: Failure) -> bool:
    """True when the peer answered no (bad secret, registration refused), not a lost link."""
    return failure.check(UnauthorizedLogin, pb.Error) is not None or "Unauthorized" in failure.getErrorMessage()


def reason_text(failure: Failure) -> str:
    """A short human reason for a failed connection, login or call."""
    value = failure.value
    name = type(value).__name__
    if "ConnectionRefused" in name:
        return "connection refused"
    if "Unauthorized" in name or "Unauthorized" in failure.getErrorMessage():
        return "login refused (cluster.secret)"
    return failure.getErrorMessage() or name
