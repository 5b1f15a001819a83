"""A result now or later: the one place that tells a value from a Deferred of it.

The engine answers most operations at once (a send to a connection of this engine) and some only
later (a send over the mesh to another engine).  Its results are therefore ``Later[T]``: a ``T``
now, or a ``Deferred`` that fires with one.  Callers never branch on the type themselves:

* ``when_ready(result, then, *args)`` applies ``then`` at once to a result now (no Deferred is made, the
  fast path stays fast), or adds it as a callback of a result later;
* ``now_or_later(result, now, later)`` picks one of two continuations, for callers whose answer
  itself differs (e.g. a web resource returning the body or ``NOT_DONE_YET``).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar, Union

from twisted.internet.defer import Deferred

__all__ = ["Later", "now_or_later", "when_ready"]

T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")

#: A ``T`` now, or a Deferred that fires with one (``Later[str | None]``).
Later = Union[T, Deferred[T]]


def when_ready(result: Later[T], then: Callable[..., R], *args: Any,
               failed: Callable[..., Any] | None = None) -> Later[R]:
    """``then(result, *args)`` now, or ``result.addCallback(then, *args)`` when it comes later.

    ``failed`` (optional) is added after ``then`` as the errback of a result later, called as
    ``failed(failure, *args)``: it sees a failure of the result or of ``then``.  A result now has
    no failure; if ``then`` raises, the exception propagates to the caller at once.  The extra
    ``args`` spare the hot paths a closure per call.
    """
    if isinstance(result, Deferred):
        if failed is None:
            return result.addCallback(then, *args)
        return result.addCallback(then, *args).addErrback(failed, *args)
    return then(result, *args)


def now_or_later(result: T | Deferred[U], now: Callable[[T], R], later: Callable[[Deferred[U]], R]) -> R:
    """``now(result)`` for a result now, ``later(deferred)`` for a result later."""
    if isinstance(result, Deferred):
        return later(result)
    return now(result)
