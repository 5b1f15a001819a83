"""The reactor as the engine sees it: one interface naming the Twisted interfaces it uses.

Twisted describes its reactor as a set of ``zope.interface`` interfaces (``IReactorTime`` for
``callLater`` / ``seconds``, ``IReactorTCP`` for ``listenTCP`` / ``connectTCP`` ...).  Code that
only schedules or reads time takes an ``IReactorTime`` (a ``twisted.internet.task.Clock`` in
tests); code that wires listeners, endpoints, processes and shutdown triggers takes a
``IReactor``, which extends every interface the service tree needs, so an ``IReactor`` can be handed
to Twisted's endpoints, ``Agent`` and ``spawnProcess`` as is.

The global reactor provides all of them but is a module attribute mypy cannot see through:
``global_reactor()`` is the one place that says so.  ``IStreamTransport`` is, likewise, the
transport of a connected stream as our protocols use it.  Tests pass a ``MemoryReactorClock`` or a
``Clock`` where these are expected (static types are not checked under ``tests/``).
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IPushProducer,
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
    ITCPTransport,
)


class IReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorSSL,
    IReactorUNIX,
    IReactorProcess,
    IReactorThreads,
    IReactorPluggableNameResolver,
):
    """What the service tree uses of the reactor (the running one provides all of it)."""


class IStreamTransport(ITCPTransport, IPushProducer):
    """The transport of a connected stream as our protocols use it: write, close or abort, and
    pause / resume reading (every TCP, TLS and UNIX transport of the reactor provides it)."""


def global_reactor() -> IReactor:
    """The installed Twisted reactor, typed as the interfaces the engine relies on."""
    from twisted.internet import reactor

    return cast(IReactor, reactor)


__all__ = ["IReactorTime", "IReactor", "IStreamTransport", "global_reactor"]
