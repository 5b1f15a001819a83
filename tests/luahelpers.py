"""Shared helpers for the Lua tests: entry scripts on disk and a wired-up engine.

``make_engine`` builds a ``Script`` bound to a real ``MixLibrary``, ``ConnectionRegistry``,
``QueueManager`` and ``Router`` (node 0, ``LocalOps``), all driven by one ``Clock``: no reactor,
no sockets.  Entry scripts are written to ``<tmp>/lua/entry.lua`` so errors read
``lua/entry.lua:<line>: ...``; stubs for missing websocket callbacks are appended *after* the
test's source, so its line numbers are the ones the test wrote.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet.task import Clock

from connmix_tx.engine.connections import ClientConnection, ConnectionRegistry
from connmix_tx.engine.queue import QueueManager
from connmix_tx.engine.router import LocalOps, Router
from connmix_tx.ids import TWITTER_EPOCH_MS, Snowflake
from connmix_tx.lua.mixlib import MixLibrary
from connmix_tx.lua.runtime import Script
from connmix_tx.testing import FakeClientTransport

STUBS = """
on_handshake = on_handshake or function() end
on_message = on_message or function() end
on_close = on_close or function() end
"""

#: An on_message that runs the message text as Lua (in the sandbox, inside a callback).
EXEC_ENTRY = "function on_message(msg) return assert(loadstring(msg.data, '=exec'))() end\n"


def write_entry(tmp_path: Path, source: str, stubs: bool = True) -> Path:
    """Write ``<tmp>/lua/entry.lua`` (dedented) and return its path."""
    folder = tmp_path / "lua"
    folder.mkdir(exist_ok=True)
    path = folder / "entry.lua"
    path.write_text(textwrap.dedent(source) + (STUBS if stubs else ""), encoding="utf-8")
    return path


def client_ids(node: int = 0) -> Callable[[], int]:
    """A generator of client ids owned by engine ``node`` (fixed time: deterministic)."""
    return Snowflake(node, now_ms=lambda: TWITTER_EPOCH_MS + 1_000_000).next_id


class Outcome:
    """A ``done(ok, value)`` recorder for ``Script.run`` / ``run_message``."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, Any]] = []

    def __call__(self, ok: bool, value: Any) -> None:
        self.calls.append((ok, value))

    @property
    def finished(self) -> bool:
        return bool(self.calls)

    @property
    def values(self) -> tuple:
        """The callback's return values; fails the test if it did not finish well exactly once."""
        assert len(self.calls) == 1, self.calls
        ok, value = self.calls[0]
        assert ok, value
        return value

    @property
    def error(self) -> str:
        """The error message; fails the test unless the callback failed exactly once."""
        assert len(self.calls) == 1, self.calls
        ok, value = self.calls[0]
        assert not ok, value
        return value


@dataclass
class Engine:
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
        outcome = Outcome()
        self.script.run(callback, conn.cid, args, outcome)
        return outcome


def make_engine(
    tmp_path: Path,
    source: str = EXEC_ENTRY,
    *,
    kind: str = "websocket",
    max_memory_mib: int = 64,
    max_instructions: int = 0,
    options: dict[str, str] | None = None,
    overrides: dict[str, Callable[..., Any]] | None = None,
    topic_size: int = 2000,
    max_topics: int = 100,
    stubs: bool = True,
    load: bool = True,
) -> Engine:
    """Wire a script to real engine objects, the way ``service.py`` does."""
    clock = Clock()
    connections = ConnectionRegistry()
    queues = QueueManager(clock, topic_size=topic_size, max_topics=max_topics)
    router = Router(0, LocalOps(connections))
    library = MixLibrary(connections, router, queues, clock, dict(options or {}))
    functions = library.functions()
    functions.update(overrides or {})
    entry = write_entry(tmp_path, source, stubs=stubs)
    script = Script(
        str(entry), kind, functions, clock,
        max_memory_mib=max_memory_mib,
        max_instructions=max_instructions,
        extensions=library.extensions(),
    )
    library.bind(script)
    if load:
        script.load()
    return Engine(clock, connections, queues, router, library, script)
