"""The Python client SDK: a Twisted back-end talking to connmix-tx engines (SPEC 7.2, 9, 10).

Three layers, from the wire up:

* ``PendingRequests`` and ``parse_frame`` (plain Python, no transport): long-form request ids,
  reply matching, events told apart from replies.
* ``ApiConnection`` (Autobahn ``WebSocketClientProtocol``): one connection to an engine's
  ``/ws/v1``; ``call(method, params)`` returns a Deferred that fires with the ``result`` or fails
  with ``ConnmixError(code, message)``; events go to a callback.  ``connect_api`` opens one.
* ``Client`` (a ``MultiService``): finds the engines (the center's ``GET /v1/nodes``, polled, or
  a fixed list), keeps one ``ApiConnection`` per engine through a ``ClientService`` with back-off,
  consumes topics on every engine (again after each reconnect) and routes ``send`` / ``conn.call``
  to the engine that holds the client (``RoutingTable``, plain Python).

The reactor is injected everywhere (it is also the clock of timeouts and polls).  See
docs/client.md for a walk-through and examples/chat_backend.py for a complete consumer.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from connmix_tx.ids import InvalidClientId, node_number_of, parse_client_id

__all__ = [
    "ApiConnection", "ApiConnectionFactory", "Client", "ConnmixError", "EngineLink", "EngineUnavailable",
    "Event", "PendingRequests", "QueueMessage", "Reply", "RoutingTable", "connect_api", "engine_url",
    "fetch_nodes", "parse_frame",
]

log = Logger(namespace="connmix.client")

#: ``(username, password)`` for HTTP Basic (SPEC 10).
Credentials = tuple[str, str]


class ConnmixError(Exception):
    """An error reply of the engine API: ``code`` (SPEC 7.6) and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"error {self.code}: {self.message}"


class EngineUnavailable(Exception):
    """No engine (or not the center) could be reached, or a connection was lost mid-request."""


# --------------------------------------------------------------------------- plain logic


@dataclass(frozen=True, slots=True)
class Reply:
    """A long-form reply: ``error`` is ``None`` or ``{"code", "message"}``."""

    id: Any
    result: Any
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Event:
    """A long-form event (``{"event", "result", "id": null}``)."""

    name: str
    result: Any


def parse_frame(payload: bytes | str) -> Reply | Event:
    """Classify one message of the engine API; raise ``ValueError`` for anything else."""
    message = json.loads(payload)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    if isinstance(message.get("event"), str):
        return Event(message["event"], message.get("result"))
    if "id" not in message or not ("result" in message or "error" in message):
        raise ValueError("neither a reply nor an event")
    error = message.get("error")
    if error is not None and not isinstance(error, dict):
        raise ValueError("error is not an object")
    return Reply(message["id"], message.get("result"), error)


class PendingRequests:
    """Request ids and the Deferreds waiting for their replies, for one connection.

    ``open`` numbers a request and returns its frame and Deferred; ``settle`` fires the Deferred
    of a reply (the result, or a ``ConnmixError`` failure); ``fail_all`` fails whatever is left
    when the connection goes.  Cancelling a Deferred (e.g. ``addTimeout``) forgets its id, so a
    late reply is ignored.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, Deferred] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, method: str, params: Sequence[Any]) -> tuple[bytes, Deferred]:
        """A new request: its JSON frame and the Deferred of its result."""
        request_id = next(self._ids)
        frame = json.dumps({"method": method, "params": list(params), "id": request_id}, separators=(",", ":"))
        waiting: Deferred = Deferred(lambda d: self._waiting.pop(request_id, None))
        self._waiting[request_id] = waiting
        return frame.encode(), waiting

    def settle(self, reply: Reply) -> bool:
        """Fire the Deferred of ``reply``; False when no request waits for that id."""
        waiting = self._waiting.pop(reply.id, None) if isinstance(reply.id, int) else None
        if waiting is None:
            return False
        if reply.error is None:
            waiting.callback(reply.result)
        else:
            code = reply.error.get("code")
            waiting.errback(ConnmixError(code if isinstance(code, int) else 0, str(reply.error.get("message", ""))))
        return True

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting request with ``error``."""
        waiting, self._waiting = self._waiting, {}
        for deferred in waiting.values():
            deferred.errback(error)


class RoutingTable:
    """Which engine holds a client: node number (SPEC 8.3) -> engine key.

    ``replace`` installs the numbers the center lists; ``learn`` adds one seen elsewhere (the
    client id of a queue event names the engine it came from).  ``route`` prefers the owner and
    falls back to any connected engine, which forwards over the mesh (SPEC 8.5).
    """

    def __init__(self) -> None:
        self._keys: dict[int, str] = {}

    def replace(self, numbers: Mapping[int, str]) -> None:
        """Forget everything and use ``numbers`` (node number -> key)."""
        self._keys = dict(numbers)

    def learn(self, number: int, key: str) -> None:
        """Remember that ``key`` is (a worker of) the engine numbered ``number``.

        An engine with several workers has one number per worker behind one key: every number
        is kept (``replace`` starts afresh from the center's list).
        """
        self._keys[number] = key

    def owner(self, client_id: Any) -> str | None:
        """The key of the engine numbered like ``client_id``, or None (unknown or invalid id)."""
        try:
            return self._keys.get(node_number_of(parse_client_id(client_id)))
        except InvalidClientId:
            return None

    def route(self, client_id: Any, connected: Sequence[str]) -> str | None:
        """The key to send a request about ``client_id`` to, among ``connected`` (in order)."""
        owner = self.owner(client_id)
        if owner in connected:
            return owner
        return connected[0] if connected else None


def engine_url(address: str, scheme: str = "ws") -> str:
    """``ws://host:port/ws/v1`` from an engine API address: ``host:port`` or a ws(s) URL."""
    if "://" in address:
        return address if urlsplit(address).path not in ("", "/") else address.rstrip("/") + "/ws/v1"
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/ws/v1"


def _address_of(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` header value for HTTP Basic."""
    username, password = credentials
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def reason_text(failure: Failure | BaseException | str) -> str:
    """A short human reason for a failed connection or request."""
    if isinstance(failure, str):
        return failure
    value = failure.value if isinstance(failure, Failure) else failure
    name = type(value).__name__
    if "ConnectionRefused" in name:
        return "connection refused"
    if "DNSLookup" in name:
        return "unknown host"
    if "TimeoutError" in name or "TimedOut" in name:
        return "timed out"
    text = str(value).strip() or name
    return text.splitlines()[0]


def close_reason(reason: str | None, code: int | None) -> str:
    """A short text for why an API connection closed (or its handshake was refused)."""
    refused = re.search(r"upgrade failed \[(\d+)\]: ?([^\"]*)", reason or "")
    if refused:
        return f"handshake refused: HTTP {refused.group(1)} {refused.group(2)}".rstrip()
    if reason:
        return reason
    return f"closed with code {code}" if code else "connection lost"


# --------------------------------------------------------------------------- one connection


class ApiConnection(WebSocketClientProtocol):
    """One WebSocket connection to an engine's ``/ws/v1`` (long form, SPEC 7.2)."""

    factory: "ApiConnectionFactory"

    def __init__(self) -> None:
        super().__init__()
        self.requests = PendingRequests()
        self.usable = False

    def call(self, method: str, params: Sequence[Any] = ()) -> Deferred:
        """Send one request; fires with its ``result`` or fails with ``ConnmixError``.

        Fails with ``EngineUnavailable`` when the connection is not open or closes before the
        reply, and with ``twisted.internet.defer.TimeoutError`` after the factory's
        ``request_timeout``.
        """
        if not self.usable:
            return fail(EngineUnavailable(f"engine {self.factory.address}: not connected"))
        frame, waiting = self.requests.open(method, params)
        self.sendMessage(frame)
        if self.factory.request_timeout:
            waiting.addTimeout(self.factory.request_timeout, self.factory.clock)
        return waiting

    def onOpen(self) -> None:
        self.usable = True
        self.factory.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = parse_frame(payload)
        except ValueError as e:
            log.warn("engine {address}: unreadable message ({reason})", address=self.factory.address, reason=e)
            return
        if isinstance(frame, Event):
            self.factory.event(self, frame)
        elif not self.requests.settle(frame):
            error = frame.error or {}
            log.warn(
                "engine {address}: reply to no request (id {id!r}): {code} {message}",
                address=self.factory.address, id=frame.id, code=error.get("code"), message=error.get("message"),
            )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        was_open, self.usable = self.usable, False
        text = close_reason(self.wasNotCleanReason or reason, code)
        self.requests.fail_all(EngineUnavailable(f"engine {self.factory.address}: {text}"))
        self.factory.closed(self, was_open, text)


class ApiConnectionFactory(WebSocketClientFactory):
    """Builds ``ApiConnection``s to one engine URL, with Basic credentials on the handshake.

    ``on_open(conn)``, ``on_close(conn, was_open, reason)`` and ``on_event(conn, event)`` are
    optional callbacks.
    """

    protocol = ApiConnection
    noisy = False

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        *,
        clock: Any,
        request_timeout: float = 30.0,
        ping_interval: float = 20.0,
        on_open: Callable[[ApiConnection], Any] | None = None,
        on_close: Callable[[ApiConnection, bool, str], Any] | None = None,
        on_event: Callable[[ApiConnection, Event], Any] | None = None,
    ) -> None:
        headers = {"Authorization": basic_authorization(credentials)} if credentials else None
        super().__init__(url, headers=headers)
        self.address = _address_of(url)
        self.clock = clock
        self.request_timeout = request_timeout
        self.on_open, self.on_close, self.on_event = on_open, on_close, on_event
        self.setProtocolOptions(
            openHandshakeTimeout=request_timeout or 30,
            closeHandshakeTimeout=1,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_interval,
            failByDrop=False,
        )

    def endpoint(self, reactor: Any, tls_options: Callable[[str], Any] | None = None) -> Any:
        """The client endpoint for this URL (TLS for ``wss://``)."""
        endpoint = endpoints.HostnameEndpoint(reactor, self.host.encode("idna"), self.port)
        if not self.isSecure:
            return endpoint
        from twisted.internet.ssl import optionsForClientTLS

        options = tls_options(self.host) if tls_options else optionsForClientTLS(self.host)
        return endpoints.wrapClientTLS(options, endpoint)

    def opened(self, conn: ApiConnection) -> None:
        if self.on_open is not None:
            self.on_open(conn)

    def closed(self, conn: ApiConnection, was_open: bool, reason: str) -> None:
        if self.on_close is not None:
            self.on_close(conn, was_open, reason)

    def event(self, conn: ApiConnection, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(conn, event)


def connect_api(
    reactor: Any,
    url: str,
    credentials: Credentials | None = None,
    on_event: Callable[[ApiConnection, Event], Any] | None = None,
    timeout: float = 10.0,
) -> Deferred:
    """Open one ``ApiConnection`` (no reconnection); fires once the WebSocket is open.

    Fails with ``EngineUnavailable`` when the engine refuses the TCP connection or the
    handshake (e.g. ``401`` without the right credentials), or after ``timeout`` seconds.
    """
    result: Deferred = Deferred()

    def opened(conn: ApiConnection) -> None:
        if result.called:  # too late: the caller was told it failed
            conn.sendClose(1000, "timed out")
        else:
            result.callback(conn)

    def closed(conn: ApiConnection, was_open: bool, reason: str) -> None:
        if not result.called:
            result.errback(EngineUnavailable(f"engine {factory.address} unreachable: {reason}"))

    factory = ApiConnectionFactory(url, credentials, clock=reactor, request_timeout=timeout,
                                   on_open=opened, on_close=closed, on_event=on_event)

    def refused(failure: Failure) -> None:
        if not result.called:
            result.errback(EngineUnavailable(f"engine {factory.address} unreachable: {reason_text(failure)}"))

    connecting = factory.endpoint(reactor).connect(factory).addErrback(refused)
    timer = reactor.callLater(timeout, refused, Failure(EngineUnavailable(f"no answer within {timeout:g} s")))
    return result.addBoth(_cancel_timer, timer).addErrback(_cancel_attempt, connecting)


def _cancel_attempt(failure: Failure, connecting: Deferred) -> Failure:
    if not connecting.called:
        connecting.cancel()
    return failure


def _cancel_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


# --------------------------------------------------------------------------- the center


def fetch_nodes(reactor: Any, center_url: str, credentials: Credentials | None = None, timeout: float = 10.0) -> Deferred:
    """``GET {center_url}/v1/nodes`` (SPEC 9); fires with the list of nodes.

    Fails with ``EngineUnavailable`` (naming the center) when it cannot be reached or answers
    anything but 200 with a JSON node list.
    """
    url = center_url.rstrip("/") + "/v1/nodes"
    headers = Headers({b"user-agent": [b"connmix-tx client"]})
    if credentials:
        headers.addRawHeader(b"authorization", basic_authorization(credentials).encode())
    agent = Agent(reactor, connectTimeout=timeout)

    def body(response: Any) -> Deferred:
        with warnings.catch_warnings():
            # readBody warns when the body already arrived (its transport proxy cannot abort).
            warnings.simplefilter("ignore", DeprecationWarning)
            return readBody(response).addCallback(parse, response.code)

    def parse(data: bytes, status: int) -> list[dict[str, Any]]:
        if status != 200:
            detail = ""
            try:
                detail = ": " + str(json.loads(data)["E"]["m"])
            except (ValueError, KeyError, TypeError):
                pass
            raise EngineUnavailable(f"center {center_url} answered HTTP {status}{detail}")
        try:
            nodes = json.loads(data)["nodes"]
        except (ValueError, KeyError, TypeError):
            raise EngineUnavailable(f"center {center_url}: not a node list") from None
        if not isinstance(nodes, list):
            raise EngineUnavailable(f"center {center_url}: not a node list")
        return nodes

    def unreachable(failure: Failure) -> Failure:
        if failure.check(EngineUnavailable):
            return failure
        return Failure(EngineUnavailable(f"center {center_url} unreachable: {reason_text(failure)}"))

    requested = agent.request(b"GET", url.encode(), headers)
    requested.addTimeout(timeout, reactor)
    return requested.addCallback(body).addErrback(unreachable)


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class QueueMessage:
    """One queue event (SPEC 6): the pushing ``client_id`` (``""`` outside a connection), the
    engine's ``node_id``, the ``topic`` and the pushed JSON ``data``; ``engine`` is the API
    address it came from."""

    client_id: str
    node_id: str
    topic: str
    data: Any
    engine: str
    #: With ``ack="manual"``: the id to pass to ``Client.ack`` (else None), and how many times
    #: the message was delivered before (docs/queues.md: handlers must tolerate redeliveries).
    message_id: str | None = None
    redelivered: int = 0


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that reports failed connection attempts (ClientService keeps them to itself)."""

    def __init__(self, endpoint: Any, on_failure: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: Any) -> Deferred:
        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                self._on_failure(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


@dataclass(eq=False)
class EngineLink:
    """One engine the client talks to: its address, number, service and open connection."""

    address: str
    url: str
    service: ClientService | None = None
    connection: ApiConnection | None = None
    number: int | None = None
    node_id: str | None = None
    last_error: str | None = None
    requests: int = 0

    @property
    def is_open(self) -> bool:
        return self.connection is not None and self.connection.usable

    def call(self, method: str, params: Sequence[Any] = ()) -> Deferred:
        """``ApiConnection.call`` on this engine's open connection."""
        if self.connection is None or not self.connection.usable:
            reason = f": {self.last_error}" if self.last_error else ""
            return fail(EngineUnavailable(f"engine {self.address} unreachable{reason}"))
        self.requests += 1
        return self.connection.call(method, params)


@dataclass
class _Consumption:
    topics: tuple[str, ...]
    callback: Callable[[QueueMessage], Any]
    ack: str = "auto"

    def params(self) -> list[Any]:
        """The ``queue.consume`` params: the seed form, or the object of a manual consumption."""
        if self.ack == "manual":
            return [{"queues": list(self.topics), "ack": "manual"}]
        return list(self.topics)


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
        reactor: Any = None,
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
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
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
        self._consumptions: list[_Consumption] = []
        self._handlers: dict[str, Callable[[QueueMessage], Any]] = {}
        self._waiters: list[_ReadyWaiter] = []
        self._turn = itertools.count()
        self._poll: LoopingCall | None = None
        for address in engines:
            url = engine_url(address, engine_scheme)
            self._add_link(_address_of(url), url)

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
        consumption = _Consumption(names, callback, ack)
        self._consumptions.append(consumption)
        self._handlers.update({t: callback for t in names})
        requests = [link.call("queue.consume", consumption.params()) for link in self._open_links()]
        return _all_or_first_error(requests)

    def ack(self, *messages: QueueMessage) -> Deferred:
        """Acknowledge messages of manual consumptions (``queue.ack`` on the engine each came
        from, one request per engine and topic).  Fires with how many the engines counted
        (ids already acknowledged or redelivered elsewhere are not counted)."""
        groups: dict[tuple[str, str], list[str]] = {}
        for message in messages:
            if message.message_id is None:
                return fail(ConnmixError(101, "invalid params: not a manually acknowledged message"))
            groups.setdefault((message.engine, message.topic), []).append(message.message_id)
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
        params: dict[str, Any] = {"client_id": str(client_id)}
        if binary:
            raw = data.encode() if isinstance(data, str) else data
            params.update(data=base64.b64encode(raw).decode("ascii"), type="binary")
        else:
            params["data"] = data.decode() if isinstance(data, bytes) else data
        return self._routed(client_id, "mesh.send", params)

    def publish(self, channel: str, data: str | bytes, binary: bool = False) -> Deferred:
        """``mesh.publish`` through one engine (it fans out to the cluster); fires with
        ``{"success": True, "total": reached, "fail": failed}``."""
        params: dict[str, Any] = {"channel": channel}
        if binary:
            raw = data.encode() if isinstance(data, str) else data
            params.update(data=base64.b64encode(raw).decode("ascii"), type="binary")
        else:
            params["data"] = data.decode() if isinstance(data, bytes) else data
        links = self._open_links()
        if not links:
            return fail(self._unavailable())
        return links[next(self._turn) % len(links)].call("mesh.publish", [params])

    def call(self, client_id: int | str, func: str, *args: Any) -> Deferred:
        """``conn.call`` of ``func(*args)`` on a connection (SPEC 7.2), routed to its engine."""
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
        result = event.result
        message_id = result.get("message_id")
        message = QueueMessage(
            str(result.get("client_id", "")), str(result.get("node_id", "")), str(result.get("queue", "")),
            result.get("data"), link.address,
            None if message_id is None else str(message_id), int(result.get("redelivered", 0) or 0),
        )
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
        for consumption in self._consumptions:
            conn.call("queue.consume", consumption.params()).addErrback(
                lambda f, topics=consumption.topics: log.error(
                    "engine {address}: consume {topics} failed: {reason}",
                    address=link.address, topics=topics, reason=reason_text(f),
                )
            )
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
                wanted[_address_of(url)] = node | {"url": url}
                if isinstance(node.get("number"), int):
                    numbers[node["number"]] = _address_of(url)
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
    if failure.check(ConnmixError) and failure.value.code == code:
        return None
    return failure


def _all_or_first_error(requests: list[Deferred]) -> Deferred:
    """Fires with the list of results, or fails with the first failure (the others are consumed)."""
    if not requests:
        return succeed([])

    def unwrap(failure: Failure) -> Failure:
        return failure.value.subFailure

    return DeferredList(requests, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
        lambda results: [value for _, value in results], unwrap
    )
