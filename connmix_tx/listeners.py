"""Listening ports: every port of the process is a ``Listener`` child service.

A listener section of the configuration (``bind``, ``port``, optional ``tls``) becomes a server
endpoint (``tcp:`` or ``ssl:`` from an endpoint string; ``SO_REUSEPORT`` for ports the workers of
one engine share, docs/workers.md).  A ``Listener`` opens its port synchronously in
``privilegedStartService``, logs its one start line, and turns a bind error into exit 3 and a bad
certificate into exit 2 (``connmix_tx.errors``).
"""

from __future__ import annotations

from typing import Callable, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint

from connmix_tx.config import AnyListener
from connmix_tx.errors import EXIT_CONFIG, EXIT_LISTEN, FatalError
from connmix_tx.reactors import IReactor
from connmix_tx.reuseport import ReusePortEndpoint
from connmix_tx.tls import TLSError, check_server_files, server_options

#: Listeners whose ``tls.caCertificates`` makes peers present a client certificate.
CLIENT_CERTIFICATE_LISTENERS = ("center.registry", "engine.meshPoint")


def _escape(text: str) -> str:
    """A value for an endpoint description (``\\``, ``:`` and ``=`` are syntax there)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def endpoint_string(listener: AnyListener) -> str:
    """The server endpoint description of a listener section: ``tcp:`` or, with ``tls``, ``ssl:``."""
    bind = _escape(listener.bind)
    tls = listener.tls
    if tls is None:
        return f"tcp:{listener.port}:interface={bind}"
    return (f"ssl:{listener.port}:interface={bind}:privateKey={_escape(tls.private_key)}"
            f":certKey={_escape(tls.certificate)}")


def server_endpoint(
    reactor: IReactor, key: str, listener: AnyListener, reuse_port: bool = False
) -> IStreamServerEndpoint:
    """The endpoint a listener serves on; a bad certificate or key is a config error (exit 2).

    ``reuse_port``: the port is shared with the other workers of the engine (``SO_REUSEPORT``).
    """
    tls = listener.tls
    if reuse_port:
        options = None
        if tls is not None:
            try:
                check_server_files(tls)
                require = bool(tls.ca_certificates) and key in CLIENT_CERTIFICATE_LISTENERS
                options = server_options(tls, require_client_certificate=require)
            except TLSError as e:
                raise FatalError(EXIT_CONFIG, f"config {key}.tls: {e}") from None
        return ReusePortEndpoint(reactor, listener.port, listener.bind, context_factory=options)
    if tls is not None:
        try:
            check_server_files(tls)
            if tls.ca_certificates and key in CLIENT_CERTIFICATE_LISTENERS:
                # The ssl: description has no way to ask for client certificates.
                options = server_options(tls, require_client_certificate=True)
                return endpoints.SSL4ServerEndpoint(reactor, listener.port, options, interface=listener.bind)
        except TLSError as e:
            raise FatalError(EXIT_CONFIG, f"config {key}.tls: {e}") from None
    return endpoints.serverFromString(reactor, endpoint_string(listener))


class Listener(StreamServerEndpointService):
    """One listening port: opens synchronously, logs its start line, maps bind errors to exit 3.

    Its service name is the configuration key of its section (``engine.apiServer``).
    """

    def __init__(
        self, reactor: IReactor, key: str, listener: AnyListener, factory: IProtocolFactory, started: Callable[[str], None],
        reuse_port: bool = False,
    ) -> None:
        super().__init__(server_endpoint(reactor, key, listener, reuse_port), factory)
        self._raiseSynchronously = True
        self.setName(key)
        self.key = key
        self.listener = listener
        self.started = started
        self.port: IListeningPort | None = None
        self._bound = listener.port

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise FatalError(EXIT_LISTEN, self._bind_error(e)) from None
        if self._waitingForPort is not None:  # set by the start above
            self._waitingForPort.addCallback(self._listening)

    def _bind_error(self, error: CannotListenError) -> str:
        reason = error.socketError
        text = getattr(reason, "strerror", None) or str(reason)
        return f"cannot listen on {self.listener.bind}:{self.listener.port} ({self.key}): {text.lower()}"

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        # Every listener is a TCP port (tcp:, ssl: or SO_REUSEPORT).
        self._bound = cast(IPv4Address, port.getHost()).port
        scheme = "tls://" if self.listener.tls is not None else ""
        self.started(f"{scheme}{self.listener.bind}:{self._bound}")
        return port

    @property
    def actual_port(self) -> int:
        """The bound port (differs from the configured one for port 0); kept after stopping."""
        return self._bound
