"""Queue messages as the client hands them to consumers, and the bookkeeping of manual acks.

``QueueMessage`` is one ``queue.consume`` event (``message_of`` reads it from the event's
result); ``Consumption`` is one ``Client.consume`` call, repeated on every engine that connects;
``ack_groups`` sorts the messages of one ``Client.ack`` by the engine and topic they came from,
since each engine acknowledges only what it delivered (docs/queues.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True, slots=True)
class QueueMessage:
    """One queue event (docs/queues.md): the pushing ``client_id`` (``""`` outside a connection),
    the engine's ``node_id``, the ``topic`` and the pushed JSON ``data``; ``engine`` is the API
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


def message_of(result: dict[str, Any], engine: str) -> QueueMessage:
    """The ``QueueMessage`` of the ``result`` of a ``queue.consume`` event from ``engine``."""
    message_id = result.get("message_id")
    return QueueMessage(
        str(result.get("client_id", "")), str(result.get("node_id", "")), str(result.get("queue", "")),
        result.get("data"), engine,
        None if message_id is None else str(message_id), int(result.get("redelivered", 0) or 0),
    )


@dataclass
class Consumption:
    """The topics of one ``Client.consume``, its callback and its ack mode."""

    topics: tuple[str, ...]
    callback: Callable[[QueueMessage], Any]
    ack: str = "auto"

    def params(self) -> list[Any]:
        """The ``queue.consume`` params: the seed form, or the object of a manual consumption."""
        if self.ack == "manual":
            return [{"queues": list(self.topics), "ack": "manual"}]
        return list(self.topics)


def ack_groups(messages: Iterable[QueueMessage]) -> dict[tuple[str, str], list[str]]:
    """The message ids to acknowledge by ``(engine, topic)``, in order.

    Raises ``ValueError`` for a message without an id (not from a manual consumption).
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for message in messages:
        if message.message_id is None:
            raise ValueError("not a manually acknowledged message")
        groups.setdefault((message.engine, message.topic), []).append(message.message_id)
    return groups
