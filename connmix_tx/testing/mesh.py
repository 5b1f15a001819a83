"""Fakes of the mesh side of routing: a link to another engine and the set of links (``MeshPeers``).

``Router`` asks ``MeshPeers.link_for(number)`` for the link to the engine that owns a client id and
calls its ``send`` / ``call`` / ``publish``; ``FakeLink`` answers with prepared values and records
every call, so router, API and HTTP tests run without PB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, succeed

if TYPE_CHECKING:
    from connmix_tx.engine.router import MeshPeers


def _answer(answer: Any) -> Any:
    return answer() if callable(answer) else answer


class FakeLink:
    """A mesh link to another engine that answers with prepared values and records the calls.

    Each answer is a value returned as it is (a Deferred, an error text, None) or a callable that
    is called once per request: return a fresh Deferred, or raise to play an engine bug.  A
    ``publish`` answer that is not a Deferred is wrapped in one, as the real link always returns a
    Deferred of ``(total, fail)`` there.
    """

    def __init__(self, send: Any = None, call: Any = None, publish: Any = (0, 0)) -> None:
        self.answers = {"send": send, "call": call, "publish": publish}
        #: ``("send", client_id, data, binary)``, ``("call", client_id, func, args)`` and
        #: ``("publish", channel, data, binary)``, in order.
        self.calls: list[tuple] = []
        #: How often the queued operations were told to leave at once (``send_now``).
        self.sent_now = 0

    @classmethod
    def answering(cls, answer: Callable[[], Any]) -> FakeLink:
        """A link whose ``send``, ``call`` and ``publish`` all return ``answer()``."""
        return cls(send=answer, call=answer, publish=answer)

    def send(self, client_id: int, data: bytes, binary: bool) -> Any:
        self.calls.append(("send", client_id, data, binary))
        return _answer(self.answers["send"])

    def call(self, client_id: int, func: str, args: list) -> Any:
        self.calls.append(("call", client_id, func, args))
        return _answer(self.answers["call"])

    def publish(self, channel: str, data: bytes, binary: bool, now: bool = True) -> Deferred:
        self.calls.append(("publish", channel, data, binary))
        if now:
            self.send_now()
        result = _answer(self.answers["publish"])
        return result if isinstance(result, Deferred) else succeed(result)

    def send_now(self) -> None:
        """What was queued leaves now: counted in ``sent_now``."""
        self.sent_now += 1


class FakePeers:
    """The links to other engines, by engine number (``MeshPeers``)."""

    def __init__(self, links: dict[int, FakeLink] | None = None) -> None:
        self.by_number = dict(links or {})

    def link_for(self, number: int) -> FakeLink | None:
        return self.by_number.get(number)

    def links(self) -> list[FakeLink]:
        return list(self.by_number.values())


if TYPE_CHECKING:  # the type checker proves the fake fits the interface
    _fits: MeshPeers = FakePeers()
