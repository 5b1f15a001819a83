"""An entry script wired to the engine's real plain objects, to test Lua code without sockets.

``script_engine(path)`` builds a ``Script`` for an entry file on disk, bound to a real
``MixLibrary``, ``ConnectionRegistry``, ``QueueManager`` and ``Router`` (engine number 0,
``LocalOps``), all driven by one ``Clock``: no reactor, no sockets, the sandbox and the ``mix``
library exactly as the engine runs them.  Connections carry a ``FakeClientTransport``::

    engine = script_engine("lua/entry.websocket.lua")
    conn, transport = engine.connect()
    assert engine.message(conn, "hello").values == ()
    assert engine.queues.topics["foo"].messages            # what the back-end will consume
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

from twisted.internet.task import Clock

from connmix_tx.engine.connections import ClientConnection, ConnectionRegistry
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.router import LocalOps, Router
from connmix_tx.ids import TWITTER_EPOCH_MS, Snowflake
from connmix_tx.lua.mixlib import MixLibrary
from connmix_tx.lua.runtime import Script
from connmix_tx.reactors import IReactor
from connmix_tx.testing.clients import FakeClientTransport


def client_ids(node: int = 0) -> Callable[[], int]:
    """A generator of client ids owned by engine ``node`` (fixed time: deterministic)."""
    return Snowflake(node, now_ms=lambda: TWITTER_EPOCH_MS + 1_000_000).next_id


class Outcome:
    """A ``done(ok, value)`` recorder for ``Script.run`` / ``Script.run_message``."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, Any]] = []

    def __call__(self, ok: bool, value: Any) -> None:
        self.calls.append((ok, value))

    @property
    def finished(self) -> bool:
        """Whether the callback ended (it may wait, e.g. on ``wait_context_value``)."""
        return bool(self.calls)

    @property
    def values(self) -> tuple:
        """The callback's return values; fails (AssertionError) unless it ended well exactly once."""
        assert len(self.calls) == 1, self.calls
        ok, value = self.calls[0]
        assert ok, value
        return value

    @property
    def error(self) -> str:
        """The error message; fails (AssertionError) unless the callback failed exactly once."""
        assert len(self.calls) == 1, self.calls
        ok, value = self.calls[0]
        assert not ok, value
        return value


@dataclass
class ScriptEngine:
    """One entry script and the engine objects around it, on ``clock``."""

    clock: Clock
    connections: ConnectionRegistry
    queues: QueueManager
    router: Router
    library: MixLibrary
    script: Script
    next_id: Callable[[], int] = field(default_factory=client_ids)

    def connect(self, ready: bool = True, error: str | None = None) -> tuple[ClientConnection, FakeClientTransport]:
        """A registered connection of this engine with a recording transport (refusing with ``error``)."""
        transport = FakeClientTransport(error)
        conn = ClientConnection(self.next_id(), "127.0.0.1:50000", transport)
        conn.ready = ready
        self.connections.add(conn)
        return conn, transport

    def message(self, conn: ClientConnection | None, data: str | bytes, kind: bytes = b"text") -> Outcome:
        """Run ``on_message`` for ``conn`` (``None``: no current connection, cid ``b""``)."""
        outcome = Outcome()
        payload = data.encode() if isinstance(data, str) else data
        self.script.run_message(conn.cid if conn else b"", kind, payload, outcome)
        return outcome

    def run(self, callback: str, conn: ClientConnection, *args: Any) -> Outcome:
        """Run the global function ``callback`` with ``conn`` as the current connection."""
        outcome = Outcome()
        self.script.run(callback, conn.cid, args, outcome)
        return outcome


def script_engine(
    entry: str | Path,
    *,
    kind: str = "websocket",
    max_memory_mib: int = 64,
    max_instructions: int = 0,
    options: dict[str, str] | None = None,
    overrides: dict[str, Callable[..., Any]] | None = None,
    topic_size: int = 2000,
    max_topics: int = 100,
    load: bool = True,
) -> ScriptEngine:
    """Wire the entry script at ``entry`` to real engine objects, the way the service does.

    ``kind`` is the server protocol (``websocket`` or ``socket``), ``options`` the server's
    ``options`` (``mix.server.option``), ``overrides`` replace host functions of the ``mix``
    library by name; ``load=False`` leaves compiling to the test (``engine.script.load()``).
    """
    clock = Clock()
    connections = ConnectionRegistry()
    queues = QueueManager(clock, topic_size=topic_size, max_topics=max_topics)
    router = Router(0, LocalOps(connections))
    # The Clock stands in for the reactor: the library schedules on it (its default HTTP client
    # and Redis pools would dial through it, so tests of those give their own).
    library = MixLibrary(connections, router, queues, cast(IReactor, clock), dict(options or {}))
    functions = library.functions()
    functions.update(overrides or {})
    script = Script(
        str(entry), kind, functions, clock,
        max_memory_mib=max_memory_mib,
        max_instructions=max_instructions,
        extensions=library.extensions(),
    )
    library.bind(script)
    if load:
        script.load()
    return ScriptEngine(clock, connections, queues, router, library, script)
