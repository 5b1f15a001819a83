"""Tests for connmix_tx.engine.session.CallbackSession: per-connection order (docs/lua-api.md).

The script records what it runs by pushing ``<text>`` to the queue topic ``log``, so the queue shows
both the order and the connection each callback ran for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from connmix_tx.engine.connections import ClientConnection
from connmix_tx.engine.session import MAX_PENDING, CallbackSession
from luahelpers import Engine, make_engine

ENTRY = """\
local function record(text) mix.queue.push('log', text) end
function on_handshake(client_id, headers, server)
  record('handshake')
  if headers and headers.wait then mix.websocket():wait_context_value('go') end
end
function on_message(msg)
  if msg.data == 'wait' then
    local v, err = mix.websocket():wait_context_value('go')
    record('woke ' .. tostring(v) .. ' ' .. tostring(err))
  elseif msg.data == 'boom' then
    local t = nil
    record(t.field)
  else
    record(msg.data)
  end
end
function on_close(client_id, err)
  record('close ' .. tostring(client_id == mix.websocket():client_id()) .. ' ' .. tostring(err))
end
"""
BOOM_LINE = 12


@dataclass
class Calls:
    """What the session told its transport."""

    overflows: int = 0
    finished: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def overflow(self) -> None:
        self.overflows += 1

    def finish(self) -> None:
        self.finished += 1

    def error(self, callback: str, message: str) -> None:
        self.errors.append((callback, message))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path, ENTRY, topic_size=10_000)


def open_session(engine: Engine) -> tuple[ClientConnection, CallbackSession, Calls]:
    conn, _ = engine.connect()
    calls = Calls()
    session = CallbackSession(engine.script, conn, calls.overflow, calls.finish, calls.error)
    return conn, session, calls


def send(session: CallbackSession, *texts: str) -> None:
    for text in texts:
        session.message(b"text", text.encode())


def log_of(engine: Engine, conn: ClientConnection | None = None) -> list[str]:
    """The texts recorded so far (only those of ``conn`` when given)."""
    topic = engine.queues.topics.get("log")
    if topic is None:
        return []
    wanted = str(conn.client_id) if conn else None
    return [json.loads(data) for cid, data in topic.messages if wanted in (None, cid)]


@pytest.fixture
def lua_errors() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "connmix.lua" and event["log_level"] >= LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def test_messages_run_in_order(engine: Engine) -> None:
    conn, session, _ = open_session(engine)
    send(session, "one", "two", "three")
    assert log_of(engine) == ["one", "two", "three"] and session.pending == 0


def test_a_suspended_connection_does_not_block_others(engine: Engine) -> None:
    a, session_a, _ = open_session(engine)
    b, session_b, _ = open_session(engine)
    send(session_a, "wait", "a1", "a2")
    send(session_b, "b1", "b2")
    assert log_of(engine) == ["b1", "b2"]
    assert session_a.pending == 2 and engine.script.waiting == 1
    a.set_context_value("go", "now")
    assert log_of(engine, a) == ["woke now nil", "a1", "a2"]
    assert log_of(engine) == ["b1", "b2", "woke now nil", "a1", "a2"]
    assert session_a.pending == 0


def test_messages_wait_for_the_handshake(engine: Engine) -> None:
    conn, session, _ = open_session(engine)
    headers = engine.script.table({b"wait": b"1"})
    handshake = session.start("on_handshake", conn.cid, headers, engine.script.table({}))
    results: list[tuple[bool, Any]] = []
    handshake.addCallback(results.append)
    send(session, "m1")
    assert log_of(engine) == ["handshake"] and results == []
    conn.set_context_value("go", 1)
    assert [ok for ok, _ in results] == [True]
    assert log_of(engine) == ["handshake", "m1"]


def test_on_close_runs_once_after_the_current_callback(engine: Engine) -> None:
    conn, session, calls = open_session(engine)
    send(session, "wait", "dropped1", "dropped2")
    session.close("read timeout")
    session.close(None)
    send(session, "after close")
    assert log_of(engine) == [] and calls.finished == 0
    conn.mark_closed()  # the transport marks it closed: the wait ends with "closed"
    assert log_of(engine) == ["woke nil closed", "close true read timeout"]
    assert calls.finished == 1 and session.pending == 0


def test_clean_close_passes_nil(engine: Engine) -> None:
    conn, session, calls = open_session(engine)
    send(session, "hello")
    session.close(None)
    assert log_of(engine) == ["hello", "close true nil"] and calls.finished == 1


def test_the_257th_pending_message_overflows(engine: Engine, lua_errors: list[dict[str, Any]]) -> None:
    conn, session, calls = open_session(engine)
    send(session, "wait")
    send(session, *(f"m{i}" for i in range(MAX_PENDING)))
    assert MAX_PENDING == 256 and session.pending == 256 and calls.overflows == 0
    send(session, "one too many")
    assert calls.overflows == 1 and session.pending == 256
    assert "too many pending messages" in formatEvent(lua_errors[-1])
    conn.set_context_value("go", 1)
    assert log_of(engine) == ["woke 1 nil"] + [f"m{i}" for i in range(MAX_PENDING)]


def test_lua_error_is_logged_and_the_next_message_runs(
    engine: Engine, lua_errors: list[dict[str, Any]]
) -> None:
    conn, session, calls = open_session(engine)
    send(session, "boom", "next")
    assert log_of(engine) == ["next"]
    (event,) = lua_errors
    assert event["log_level"] == LogLevel.error
    message = f"lua/entry.lua:{BOOM_LINE}: attempt to index local 't' (a nil value)"
    assert formatEvent(event) == f"lua error in on_message (lua/entry.lua) client {conn.client_id}: {message}"
    assert calls.errors == [("on_message", message)]


def test_close_silently_runs_no_on_close(engine: Engine) -> None:
    conn, session, calls = open_session(engine)
    session.close_silently()
    send(session, "ignored")
    assert log_of(engine) == [] and calls.finished == 1


def test_close_silently_waits_for_the_running_callback(engine: Engine) -> None:
    conn, session, calls = open_session(engine)
    headers = engine.script.table({b"wait": b"1"})
    session.start("on_handshake", conn.cid, headers, engine.script.table({}))
    session.close_silently()
    session.close("connection lost")  # no on_close after a silent close either
    assert calls.finished == 0
    conn.mark_closed()
    assert log_of(engine) == ["handshake"] and calls.finished == 1
