"""The Python client SDK: a Twisted back-end talking to connmix-tx engines.

Four rooms, from the wire up:

* ``wire``: ``PendingRequests`` and ``parse_frame`` (plain Python, no transport): long-form
  request ids, reply matching, events told apart from replies; the errors ``ConnmixError`` and
  ``EngineUnavailable``.
* ``connection``: ``ApiConnection`` (Autobahn ``WebSocketClientProtocol``), one connection to an
  engine's ``/ws/v1`` whose ``call(method, params)`` returns a Deferred of the ``result``;
  ``connect_api`` opens one; ``EngineLink`` keeps one per engine, reconnecting with back-off.
* ``discovery`` and ``messages``: the center's node list (``fetch_nodes``), the routing table, and
  the queue messages handed to consumers (with their manual acks).
* ``cluster``: ``Client`` (a ``MultiService``), the cluster-wide view a back-end uses.

Everything is imported from here (``from connmix_tx.client import Client``).  See
docs/client.md for a walk-through and examples/chat_backend.py for a complete consumer.
"""

from connmix_tx.client.cluster import Client
from connmix_tx.client.connection import ApiConnection, ApiConnectionFactory, EngineLink, connect_api
from connmix_tx.client.discovery import RoutingTable, fetch_nodes
from connmix_tx.client.messages import QueueMessage
from connmix_tx.client.wire import (
    ConnmixError, Credentials, EngineUnavailable, Event, PendingRequests, Reply, basic_authorization,
    close_reason, engine_url, parse_frame, reason_text,
)

__all__ = [
    "ApiConnection", "ApiConnectionFactory", "Client", "ConnmixError", "Credentials", "EngineLink",
    "EngineUnavailable", "Event", "PendingRequests", "QueueMessage", "Reply", "RoutingTable",
    "basic_authorization", "close_reason", "connect_api", "engine_url", "fetch_nodes", "parse_frame",
    "reason_text",
]
