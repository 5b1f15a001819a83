"""Where the engines are and which one holds a client: the center's node list and the routing table.

``fetch_nodes`` asks the center for its engines (``GET /v1/nodes``, docs/api.md); ``RoutingTable``
(plain Python) maps the node number inside a client id to the engine that holds it, so ``Client``
sends a request about a connection straight to its engine.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from connmix_tx.client.wire import Credentials, EngineUnavailable, basic_authorization, reason_text
from connmix_tx.ids import InvalidClientId, node_number_of, parse_client_id
from connmix_tx.reactors import IReactor


class RoutingTable:
    """Which engine holds a client: node number -> engine key.

    ``replace`` installs the numbers the center lists; ``learn`` adds one seen elsewhere (the
    client id of a queue event names the engine it came from).  ``route`` prefers the owner and
    falls back to any connected engine, which forwards over the mesh.
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


def fetch_nodes(reactor: IReactor, center_url: str, credentials: Credentials | None = None, timeout: float = 10.0) -> Deferred:
    """``GET {center_url}/v1/nodes``; fires with the list of nodes.

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
