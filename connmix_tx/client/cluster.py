"""The cluster-wide client: one ``Client`` for every engine a back-end talks to.

``Client`` (a ``MultiService``) finds the engines (the center's ``GET /v1/nodes``, polled, or a
fixed list), keeps one ``EngineLink`` per engine (a ``ClientService`` with back-off), consumes
topics on every engine (again after each reconnect) and routes ``send`` / ``conn.call`` to the
engine that holds the client (``RoutingTable``).  The reactor is injected (it is also the clock of
timeouts and polls).  See docs/client.md for a walk-through.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.client.connection import ApiConnection, ApiConnectionFactory, EngineLink, _WatchedEndpoint
from connmix_tx.client.discovery import RoutingTable, fetch_nodes
from connmix_tx.client.messages import Consumption, QueueMessage, ack_groups, message_of
from connmix_tx.client.wire import (
    ConnmixError, Credentials, EngineUnavailable, Event, address_of, engine_url, payload_params, reason_text,
)
from connmix_tx.ids import InvalidClientId, node_number_of, parse_client_id
from connmix_tx.reactors import IReactor, global_reactor

log = Logger(namespace="connmix.client")


@dataclass
class _ReadyWaiter:
    deferred: Deferred
    fail_fast: bool
    timer: Any = None


class Client(MultiService):
    """A back-end's view of a connmix-tx cluster (or of one engine without a center).

    ``Client(center_url="http://center:6787")`` discovers the engines from ``GET /v1/nodes`` every
    ``poll_interval`` seconds; ``Client(engines=["ws://host:6789/ws/v1"])`` uses a fixed list.
    ``credentials=(user, password)`` are sent as HTTP Basic to the center and the engines.

    Start it with ``start()`` (or as a child of your service tree), wait with ``ready()`` if you
    need every engine connected, and ``stop()`` it at the end.  Every request method returns a
    Deferred that fires with the engine's ``result`` dict or fails with ``ConnmixError`` (an API
    error) or ``EngineUnavailable`` (no open connection to route it to).
    """

    def __init__(
        self,
        center_url: str | None = None,
        engines: Sequence[str] = (),
        credentials: Credentials | None = None,
        reactor: IReactor | None = None,
        *,
        poll_interval: float = 10.0,
        request_timeout: float = 30.0,
        ping_interval: float = 20.0,
        retry_policy: Callable[[int], float] | None = None,
        engine_scheme: str = "ws",
        tls_options: Callable[[str], Any] | None = None,
        on_engine: Callable[[EngineLink, bool, str | None], Any] | None = None,
    ) -> None:
        """``on_engine(link, up, reason)`` is called when an engine connection opens or closes."""
        super().__init__()
        if (center_url is None) == (not engines):
            raise ValueError("give either center_url or engines")
        self.reactor = reactor if reactor is not None else global_reactor()
        self.center_url = center_url
        self.credentials = credentials
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self.engine_scheme = engine_scheme
        self.tls_options = tls_options
        self.on_engine = on_engine
        self.routes = RoutingTable()
        self.links: dict[str, EngineLink] = {}
        self.discovered = center_url is None
        self.center_error: str | None = None
        self._consumptions: list[Consumption] = []
        self._handlers: dict[str, Callable[[QueueMessage], Any]] = {}
        self._waiters: list[_ReadyWaiter] = []
        self._turn = itertools.count()
        self._poll: LoopingCall | None = None
        for address in engines:
            url = engine_url(address, engine_scheme)
            self._add_link(address_of(url), url)

    # -- lifecycle

    def start(self) -> None:
        """Start connecting (``startService``)."""
        self.startService()

    def stop(self) -> Deferred:
        """Close every connection and stop polling; fires when all connections are closed."""
        return maybeDeferred(self.stopService)

    def startService(self) -> None:
        super().startService()
        if self.center_url is not None:
            self._poll = LoopingCall(self._discover)
            self._poll.clock = self.reactor
            self._poll.start(self.poll_interval, now=True)

    def stopService(self) -> Deferred:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for waiter in list(self._waiters):
            self._settle(waiter, EngineUnavailable("client stopped"))
        for link in self.links.values():
            if link.is_open:
                assert link.connection is not None
                link.connection.sendClose(1000, "client stopping")
        return maybeDeferred(super().stopService)

    def ready(self, timeout: float = 10.0, fail_fast: bool = False) -> Deferred:
        """Fires with the list of engine links once every known engine has an open connection.

        With a center, the first discovery must have listed at least one engine.  Fails with
        ``EngineUnavailable`` after ``timeout`` seconds, or, with ``fail_fast``, at the first
        failure (center or engine unreachable, handshake refused, no engine registered).
        """
        waiter = _ReadyWaiter(Deferred(), fail_fast)
        waiter.timer = self.reactor.callLater(timeout, self._ready_timeout, waiter, timeout)
        self._waiters.append(waiter)
        self._check_ready()
        return waiter.deferred

    # -- requests

    def consume(self, topics: Iterable[str] | str, callback: Callable[[QueueMessage], Any],
                ack: str = "auto") -> Deferred:
        """Consume ``topics`` on every engine, now and after every reconnect.

        ``callback(QueueMessage)`` runs for each event; it may return a Deferred (failures are
        logged).  Fires with the results of the engines connected now (none is fine: they
        consume as they connect); fails with the first ``ConnmixError`` of one of them.

        ``ack="manual"``: each message carries a ``message_id`` and is delivered again (to this
        or another consumer) unless ``ack(message)`` confirms it within the engine's
        ``ackTimeout``; handlers must then tolerate a message seen twice (docs/queues.md).
        """
        names = (topics,) if isinstance(topics, str) else tuple(topics)
        if not names:
            return fail(ConnmixError(101, "invalid params: no topic"))
        if ack not in ("auto", "manual"):
            return fail(ConnmixError(101, 'invalid params: ack must be "auto" or "manual"'))
        taken = [t for t in names if t in self._handlers]
        if taken:
            return fail(ConnmixError(202, f"duplicate consumption: {', '.join(taken)}"))
        consumption = Consumption(names, callback, ack)
        self._consumptions.append(consumption)
        self._handlers.update({t: callback for t in names})
        requests = [link.call("queue.consume", consumption.params()) for link in self._open_links()]
        return _all_or_first_error(requests)

    def ack(self, *messages: QueueMessage) -> Deferred:
        """Acknowledge messages of manual consumptions (``queue.ack`` on the engine each came
        from, one request per engine and topic).  Fires with how many the engines counted
        (ids already acknowledged or redelivered elsewhere are not counted)."""
        try:
            groups = ack_groups(messages)
        except ValueError as e:
            return fail(ConnmixError(101, f"invalid params: {e}"))
        requests = []
        for (address, topic), ids in groups.items():
            link = self.links.get(address)
            if link is None:
                requests.append(fail(EngineUnavailable(f"engine {address} left the cluster")))
                continue
            requests.append(link.call("queue.ack", [{"queue": topic, "ids": ids}]))
        return _all_or_first_error(requests).addCallback(
            lambda results: sum(int(r.get("acked", 0)) for r in results))

    def unconsume(self) -> Deferred:
        """Stop consuming every topic on every engine (``queue.unconsume``)."""
        self._consumptions.clear()
        self._handlers.clear()
        requests = [link.call("queue.unconsume").addErrback(_ignore_code, 203) for link in self._open_links()]
        return _all_or_first_error(requests)

    def send(self, client_id: int | str, data: str | bytes, binary: bool = False) -> Deferred:
        """``mesh.send`` to one connection; ``binary`` sends a binary frame (``data`` bytes or text)."""
        params = payload_params({"client_id": str(client_id)}, data, binary)
        return self._routed(client_id, "mesh.send", params)

    def publish(self, channel: str, data: str | bytes, binary: bool = False) -> Deferred:
        """``mesh.publish`` through one engine (it fans out to the cluster); fires with
        ``{"success": True, "total": reached, "fail": failed}``."""
        params = payload_params({"channel": channel}, data, binary)
        links = self._open_links()
        if not links:
            return fail(self._unavailable())
        return links[next(self._turn) % len(links)].call("mesh.publish", [params])

    def call(self, client_id: int | str, func: str, *args: Any) -> Deferred:
        """``conn.call`` of ``func(*args)`` on a connection, routed to its engine."""
        return self._routed(client_id, "conn.call", {"client_id": str(client_id), "func": func, "args": list(args)})

    def set_context_value(self, client_id: int | str, key: str, value: Any) -> Deferred:
        """Set (or, with ``None``, remove) one context key of a connection."""
        return self.call(client_id, "set_context_value", key, value)

    def set_context(self, client_id: int | str, mapping: Mapping[str, Any]) -> Deferred:
        """Merge ``mapping`` into a connection's context."""
        return self.call(client_id, "set_context", dict(mapping))

    def subscribe(self, client_id: int | str, *channels: str) -> Deferred:
        """Subscribe a connection to channels."""
        return self.call(client_id, "subscribe", *channels)

    def unsubscribe(self, client_id: int | str, *channels: str) -> Deferred:
        """Unsubscribe a connection from channels."""
        return self.call(client_id, "unsubscribe", *channels)

    def close(self, client_id: int | str) -> Deferred:
        """Close a connection."""
        return self.call(client_id, "close")

    def ping(self) -> Deferred:
        """``server.ping`` every connected engine; fires with ``{address: seconds}``."""
        links = self._open_links()
        if not links:
            return fail(self._unavailable())

        def timed(link: EngineLink) -> Deferred:
            started = time.perf_counter()
            return link.call("server.ping").addCallback(lambda _: (link.address, time.perf_counter() - started))

        return _all_or_first_error([timed(link) for link in links]).addCallback(dict)

    def route(self, client_id: int | str) -> EngineLink | None:
        """The connected engine a request about ``client_id`` goes to (None: none connected)."""
        key = self.routes.route(client_id, [link.address for link in self._open_links()])
        return self.links.get(key) if key is not None else None

    # -- internals: routing and consumption

    def _open_links(self) -> list[EngineLink]:
        return [link for link in self.links.values() if link.is_open]

    def _unavailable(self) -> EngineUnavailable:
        if self.center_url is not None and not self.links:
            reason = self.center_error or "no engine registered"
            return EngineUnavailable(f"center {self.center_url}: {reason}")
        errors = [f"{link.address}: {link.last_error}" for link in self.links.values() if link.last_error]
        return EngineUnavailable("no engine connected" + (f" ({'; '.join(errors)})" if errors else ""))

    def _routed(self, client_id: int | str, method: str, params: dict[str, Any]) -> Deferred:
        link = self.route(client_id)
        if link is None:
            return fail(self._unavailable())
        return link.call(method, [params])

    def _event(self, link: EngineLink, event: Event) -> None:
        if event.name != "queue.consume" or not isinstance(event.result, dict):
            log.debug("engine {address}: ignored event {name}", address=link.address, name=event.name)
            return
        message = message_of(event.result, link.address)
        if message.client_id:  # any worker of the engine may have pushed: learn each number
            try:
                number = node_number_of(parse_client_id(message.client_id))
            except InvalidClientId:
                number = None
            if number is not None:
                if link.number is None:
                    link.number = number
                self.routes.learn(number, link.address)
        handler = self._handlers.get(message.topic)
        if handler is None:
            log.warn("engine {address}: event of topic {topic} nobody consumes", address=link.address, topic=message.topic)
            return
        maybeDeferred(handler, message).addErrback(
            lambda f: log.failure("consumer of {topic} failed", f, topic=message.topic)
        )

    # -- internals: engine links

    def _add_link(self, address: str, url: str) -> EngineLink:
        link = EngineLink(address, url)
        factory = ApiConnectionFactory(
            url, self.credentials, clock=self.reactor, request_timeout=self.request_timeout,
            ping_interval=self.ping_interval,
            on_open=lambda conn: self._opened(link, conn),
            on_close=lambda conn, was_open, reason: self._closed(link, conn, was_open, reason),
            on_event=lambda conn, event: self._event(link, event),
        )
        endpoint = _WatchedEndpoint(factory.endpoint(self.reactor, self.tls_options),
                                    lambda failure: self._failed(link, reason_text(failure)))
        link.service = ClientService(endpoint, factory, retryPolicy=self.retry_policy, clock=self.reactor)
        link.service.setServiceParent(self)
        self.links[address] = link
        return link

    def _remove_link(self, link: EngineLink) -> None:
        del self.links[link.address]
        log.info("engine {address} left the center's list", address=link.address)
        if link.is_open:
            assert link.connection is not None
            link.connection.sendClose(1000, "engine left the cluster")
        if link.service is not None:
            maybeDeferred(link.service.disownServiceParent)
        self._check_ready()

    def _opened(self, link: EngineLink, conn: ApiConnection) -> None:
        link.connection, link.last_error = conn, None
        log.info("api connection to engine {address} up", address=link.address)

        def failed(failure: Failure, topics: object) -> None:
            log.error("engine {address}: consume {topics} failed: {reason}",
                      address=link.address, topics=topics, reason=reason_text(failure))

        for consumption in self._consumptions:
            conn.call("queue.consume", consumption.params()).addErrback(failed, consumption.topics)
        self._notify(link, True, None)
        self._check_ready()

    def _closed(self, link: EngineLink, conn: ApiConnection, was_open: bool, reason: str) -> None:
        if link.connection is conn:
            link.connection = None
        if not self.running:
            return
        if was_open:
            log.info("api connection to engine {address} down: {reason}", address=link.address, reason=reason)
            self._notify(link, False, reason)
        self._failed(link, reason)

    def _failed(self, link: EngineLink, reason: str) -> None:
        if link.last_error != reason:
            log.warn("engine {address} unreachable: {reason}", address=link.address, reason=reason)
        link.last_error = reason
        self._check_ready()

    def _notify(self, link: EngineLink, up: bool, reason: str | None) -> None:
        if self.on_engine is not None:
            try:
                self.on_engine(link, up, reason)
            except Exception:
                log.failure("on_engine callback failed")

    def _discover(self) -> Deferred:
        """One poll of the center; never fails (the LoopingCall would stop)."""
        assert self.center_url is not None
        polled = fetch_nodes(self.reactor, self.center_url, self.credentials, timeout=max(1.0, self.poll_interval))
        return polled.addCallbacks(self._apply_nodes, self._discovery_failed)

    def _discovery_failed(self, failure: Failure) -> None:
        reason = reason_text(failure)
        if self.center_error != reason:
            log.warn("{reason}", reason=reason)
        self.center_error = reason
        self._check_ready()

    def _apply_nodes(self, nodes: list[dict[str, Any]]) -> None:
        if not self.running:
            return
        if self.center_error is not None:
            log.info("center {url} reachable again", url=self.center_url)
        self.center_error = None
        wanted: dict[str, dict[str, Any]] = {}
        numbers: dict[int, str] = {}  # every worker's number -> the engine's one API address
        for node in nodes:
            if isinstance(node, dict) and isinstance(node.get("api_server"), str):
                url = engine_url(node["api_server"], self.engine_scheme)
                wanted[address_of(url)] = node | {"url": url}
                if isinstance(node.get("number"), int):
                    numbers[node["number"]] = address_of(url)
        for link in [link for address, link in self.links.items() if address not in wanted]:
            self._remove_link(link)
        for address, node in wanted.items():
            link = self.links.get(address) or self._add_link(address, node["url"])
            if isinstance(node.get("number"), int):
                link.number = node["number"]
            link.node_id = node.get("id")
        self.routes.replace(numbers)
        self.discovered = True
        self._check_ready()

    # -- internals: ready()

    def _check_ready(self) -> None:
        for waiter in list(self._waiters):
            outcome = self._readiness(waiter.fail_fast)
            if outcome is not None:
                self._settle(waiter, outcome)

    def _readiness(self, fail_fast: bool) -> list[EngineLink] | Exception | None:
        if not self.discovered:
            if fail_fast and self.center_error:
                return EngineUnavailable(self.center_error)
            return None
        links = list(self.links.values())
        if not links:
            return EngineUnavailable(f"center {self.center_url}: no engine registered") if fail_fast else None
        if all(link.is_open for link in links):
            return links
        if fail_fast:
            for link in links:
                if not link.is_open and link.last_error:
                    return EngineUnavailable(f"engine {link.address} unreachable: {link.last_error}")
        return None

    def _ready_timeout(self, waiter: _ReadyWaiter, timeout: float) -> None:
        waiter.timer = None
        outcome = self._readiness(True)
        if outcome is None:
            if not self.discovered:
                reason = self.center_error or f"no answer within {timeout:g} s"
                outcome = EngineUnavailable(f"center {self.center_url} unreachable: {reason}")
            else:
                late = [link.address for link in self.links.values() if not link.is_open]
                outcome = EngineUnavailable(f"engine {', '.join(late)} unreachable: no answer within {timeout:g} s")
        self._settle(waiter, outcome)

    def _settle(self, waiter: _ReadyWaiter, outcome: list[EngineLink] | Exception) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        if isinstance(outcome, Exception):
            waiter.deferred.errback(outcome)
        else:
            waiter.deferred.callback(outcome)


def _ignore_code(failure: Failure, code: int) -> Any:
    error = failure.value
    if isinstance(error, ConnmixError) and error.code == code:
        return None
    return failure


def _all_or_first_error(requests: list[Deferred]) -> Deferred:
    """Fires with the list of results, or fails with the first failure (the others are consumed)."""
    if not requests:
        return succeed([])

    def unwrap(failure: Failure) -> Failure:
        # fireOnOneErrback: the list fails with a FirstError wrapping the first failure.
        return cast(FirstError, failure.value).subFailure

    return DeferredList(requests, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
        lambda results: [value for _, value in results], unwrap
    )
