"""Listening sockets shared by the worker processes of one engine (``SO_REUSEPORT``).

The workers of a multi-process engine (docs/workers.md) each open the
same protocol server ports and the same engine API port; with ``SO_REUSEPORT`` set on every one of
those sockets the kernel spreads new connections over the workers.  Twisted's endpoints do not
offer the option, so ``ReusePort`` is a ``tcp.Port`` whose socket gets it before ``bind``, and
``ReusePortEndpoint`` serves it as an ``IStreamServerEndpoint`` -- over TLS with a
``TLSMemoryBIOFactory`` wrapper, as Twisted's own ``SSL4ServerEndpoint`` does.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from connmix_tx.reactors import IReactor

#: False where the platform has no ``SO_REUSEPORT`` (then only one worker can bind a port).
HAVE_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


class ReusePort(tcp.Port):
    """A TCP listening port whose socket carries ``SO_REUSEPORT`` (and Twisted's ``SO_REUSEADDR``)."""

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        if HAVE_REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP (or, with ``context_factory``, TLS) server endpoint listening with ``SO_REUSEPORT``.

    :param context_factory: an ``IOpenSSLServerConnectionCreator`` such as
        ``ssl.CertificateOptions``; None serves plain TCP.
    """

    def __init__(self, reactor: IReactor, port: int, interface: str = "", backlog: int = 50,
                 context_factory: Any = None) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.context_factory = context_factory

    def listen(self, protocolFactory: Any) -> defer.Deferred:
        """Start listening; the Deferred fires with the ``IListeningPort`` or fails with
        ``CannotListenError``, synchronously."""
        factory = protocolFactory
        if self.context_factory is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self.context_factory, False, protocolFactory)
        port = ReusePort(self.port, factory, self.backlog, self.interface, self.reactor)
        try:
            port.startListening()
        except Exception:
            return defer.fail()
        return defer.succeed(port)
