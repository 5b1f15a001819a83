"""Node 0 with one API session, for the tests of the API dispatcher in both dialects.

Real queues (on a Clock), connection registry and router; fake client transports and mesh links
from ``connmix_tx.testing``.  ``Engine.request`` / ``handle`` return the decoded reply.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from connmix_tx.engine.api import ApiDispatcher, ApiSession
from connmix_tx.engine.connections import ClientConnection, ConnectionRegistry
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.router import LocalOps, Router
from connmix_tx.ids import Snowflake
from connmix_tx.testing import FakeClientTransport, FakeLink, FakePeers

NODE_ID = "c8u7jfbin5659oh0b13g"
SEED_CLIENT_ID = 1463819408261513216  # node 0
REMOTE_CLIENT_ID = Snowflake(5, lambda: 1_700_000_000_000).next_id()  # node 5


def raise_boom() -> Any:
    """A mesh link answer that raises (an engine bug on the way to another engine)."""
    raise RuntimeError("boom")


class Engine:
    """Node 0 with one API session; ``request`` returns the decoded reply.

    ``link`` is the mesh link to engine 5, the owner of ``REMOTE_CLIENT_ID`` (none by default).
    """

    def __init__(self, max_topics: int = 100, link: FakeLink | None = None) -> None:
        self.clock = Clock()
        self.queues = QueueManager(self.clock, topic_size=100, max_topics=max_topics)
        self.connections = ConnectionRegistry()
        router = Router(0, LocalOps(self.connections), FakePeers({5: link} if link else {}))
        self.dispatcher = ApiDispatcher(router, self.queues)
        self.written: list[bytes] = []
        self.session = self.new_session()

    def new_session(self) -> ApiSession:
        return ApiSession(self.written.append, lambda: 0, NODE_ID, "127.0.0.1:50000")

    def handle(self, raw: bytes, session: ApiSession | None = None) -> Any:
        reply = self.dispatcher.handle(session or self.session, raw)
        if isinstance(reply, Deferred):
            got: list = []
            reply.addCallback(got.append)
            return json.loads(got[0])
        assert isinstance(reply, bytes)
        return json.loads(reply)

    def request(self, method: str, params: Any = (), request_id: Any = 12345, **kw: Any) -> Any:
        body = {"method": method, "params": list(params) if isinstance(params, tuple) else params,
                "id": request_id}
        return self.handle(json.dumps(body).encode(), **kw)

    def connect(self, client_id: int = SEED_CLIENT_ID, error: str | None = None) -> ClientConnection:
        conn = ClientConnection(client_id, "203.0.113.9:5000", FakeClientTransport(error))
        conn.ready = True
        self.connections.add(conn)
        return conn
