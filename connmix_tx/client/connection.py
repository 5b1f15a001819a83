"""One connection to one engine: the WebSocket protocol, its factory, and the reconnecting link.

``ApiConnection`` (Autobahn ``WebSocketClientProtocol``) is one connection to an engine's
``/ws/v1``: ``call(method, params)`` returns a Deferred that fires with the ``result`` or fails
with ``ConnmixError(code, message)``; events go to a callback.  ``connect_api`` opens one without
reconnection.  ``EngineLink`` is what ``Client`` keeps per engine: a ``ClientService`` with
back-off behind a ``_WatchedEndpoint`` (which reports failed attempts) and the connection open
now, if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connmix_tx.client.wire import (
    Credentials, EngineUnavailable, Event, PendingRequests, address_of, basic_authorization, close_reason,
    parse_frame, reason_text,
)
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.client")


class ApiConnection(WebSocketClientProtocol):
    """One WebSocket connection to an engine's ``/ws/v1`` (long form)."""

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

    # Autobahn derives from the unparameterised twisted ClientFactory, whose ``protocol`` must
    # build a protocol typed with that base factory; ours is typed with its own factory class.
    protocol = ApiConnection  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        *,
        clock: IReactorTime,
        request_timeout: float = 30.0,
        ping_interval: float = 20.0,
        on_open: Callable[[ApiConnection], Any] | None = None,
        on_close: Callable[[ApiConnection, bool, str], Any] | None = None,
        on_event: Callable[[ApiConnection, Event], Any] | None = None,
    ) -> None:
        headers = {"Authorization": basic_authorization(credentials)} if credentials else None
        super().__init__(url, headers=headers)
        self.address = address_of(url)
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

    def endpoint(self, reactor: IReactor, tls_options: Callable[[str], Any] | None = None) -> Any:
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
    reactor: IReactor,
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
