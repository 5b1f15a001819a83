"""The engine's registration at the center (docs/operations.md, "The cluster"): PB login, register,
heartbeats.

``CenterLink`` keeps one PB connection to the center registry through a ``ClientService``: on
every (re)connection it logs in as ``engine`` with the cluster secret, registers (claiming its
number once it has one) and then sends a heartbeat every ``heartbeatInterval``.  ``registered``
fires with the node number the first time; node lists pushed by the center go to ``on_nodes``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from connmix_tx.errors import EXIT_REGISTER
from connmix_tx.pb import ENGINE_USER, BrokerFactory, is_refusal, login, reason_text, retry_delay

log = Logger(namespace="connmix.engine")

WARN_EVERY = 30.0


class _NodeListMind(pb.Referenceable):
    """What the center calls back: node-list pushes."""

    def __init__(self, on_nodes: Callable[[list], None]) -> None:
        self.on_nodes = on_nodes

    def remote_nodes(self, nodes: list) -> None:
        self.on_nodes(list(nodes))


def _drop(broker: pb.Broker) -> None:
    """Close the connection of a broker (connected: a login ran over it)."""
    if broker.transport is not None:
        broker.transport.loseConnection()


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """Wraps the registry endpoint to remember why the last connection attempt failed."""

    def __init__(self, inner: IStreamClientEndpoint, link: "CenterLink") -> None:
        self.inner = inner
        self.link = link

    def connect(self, factory: IProtocolFactory) -> Deferred:
        return self.inner.connect(factory).addErrback(self.link._connect_failed)


class CenterLink(service.Service):
    """Registration of this engine at the center registry."""

    def __init__(
        self,
        endpoint: Callable[[], tuple[IStreamClientEndpoint, str]],
        node_id: str,
        info: dict[str, Any],
        secret: str,
        clock: IReactorTime,
        heartbeat_interval: float,
        stats: Callable[[], dict[str, int]],
        on_nodes: Callable[[list], None],
        fatal: Callable[[int, str], None],
        register_timeout: float | None = None,
    ) -> None:
        self._endpoint = endpoint
        self.node_id = node_id
        self.info = dict(info)
        self.secret = secret
        self.clock = clock
        self.stats = stats
        self.on_nodes = on_nodes
        self.fatal = fatal
        self.register_timeout = register_timeout
        self.number: int | None = None
        self.registered: Deferred = Deferred()
        self.address = ""
        self._avatar: Any = None
        self._client: ClientService | None = None
        self._deadline: IDelayedCall | None = None
        self._last_error = "no answer"
        self._last_warning = -WARN_EVERY
        self._refusals = 0
        self._mind = _NodeListMind(on_nodes)
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._interval = heartbeat_interval

    def startService(self) -> None:
        super().startService()
        endpoint, self.address = self._endpoint()
        self._client = ClientService(
            _RecordingEndpoint(endpoint, self),
            BrokerFactory(self._connected),
            retryPolicy=lambda failed: retry_delay(failed + self._refusals),
            clock=self.clock,
        )
        self._client.startService()
        if self.register_timeout is not None:
            self._deadline = self.clock.callLater(self.register_timeout, self._give_up)

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._client is not None:
            client, self._client = self._client, None
            return client.stopService()
        return None

    # Connection ------------------------------------------------------------------------------

    def _connect_failed(self, failure: Failure) -> Failure:
        self._last_error = reason_text(failure)
        now = self.clock.seconds()
        if self.number is not None and now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warn(
                "center registry {address} unreachable: {reason}; retrying",
                address=self.address,
                reason=self._last_error,
            )
        return failure

    @inlineCallbacks
    def _connected(self, broker: pb.Broker) -> Any:
        log.info("center registry {address} connect successful", address=self.address)
        try:
            avatar = yield login(broker, ENGINE_USER, self.secret.encode(), self._mind)
            info = dict(self.info)
            if self.number is not None:
                info["number"] = self.number
            answer = yield avatar.callRemote("register", self.node_id, info)
        except Exception:
            failure = Failure()
            if self._client is None:
                return  # stopped meanwhile
            self._last_error = reason_text(failure)
            if is_refusal(failure):
                self._refusals += 1
                self._refused(self._last_error)
            _drop(broker)
            return
        if self._client is None:
            _drop(broker)
            return
        self._refusals = 0
        self._avatar = avatar
        broker.notifyOnDisconnect(self._lost)
        number = int(answer["number"])
        if self.number is not None and number != self.number:
            self.fatal(EXIT_REGISTER, f"node number {self.number} lost; exiting")
            return
        log.info("register engine node_id {node_id} number {number}", node_id=self.node_id, number=number)
        self.on_nodes(list(answer.get("nodes", [])))
        if not self._heartbeat.running:
            self._heartbeat.start(self._interval, now=False)
        if self.number is None:
            self.number = number
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self.registered.callback(number)

    def _refused(self, reason: str) -> None:
        """The center said no.  Only a lost node number ends a registered engine
        (docs/operations.md, "Heartbeats and failures")."""
        if self.number is None and self.register_timeout is not None:
            self.fatal(EXIT_REGISTER, f"center registry {self.address} refused registration: {reason}")
        elif self.number is not None and "node number" in reason:
            self.fatal(EXIT_REGISTER, f"node number {self.number} lost; exiting ({reason})")
        else:
            log.error("center registry {address} refused registration: {reason}; retrying",
                      address=self.address, reason=reason)

    def _lost(self) -> None:
        self._avatar = None
        if self._heartbeat.running:
            self._heartbeat.stop()

    def _give_up(self) -> None:
        if self.number is None:
            self.fatal(EXIT_REGISTER, f"cannot reach center registry {self.address}: {self._last_error}")

    def _beat(self) -> None:
        if self._avatar is None:
            return
        self._avatar.callRemote("heartbeat", self.stats()).addCallbacks(
            self._beat_answer, lambda f: None
        )

    def _beat_answer(self, known: bool) -> None:
        if not known and self._avatar is not None:
            # The center forgot this engine (it restarted or timed us out): register again.
            broker = self._avatar.broker
            self._avatar = None
            broker.transport.loseConnection()

