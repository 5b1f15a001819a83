"""Tests for connmix_tx.engine.backlog: reading pauses behind a connection's waiting callback.

Unit tests drive ``Backlog`` with a ``Clock`` and a fake reader whose transport records
``pauseProducing`` / ``resumeProducing``, and ``CallbackSession``'s ``on_drained`` on a wired-up Lua
engine.  The integration tests start the real service tree on 127.0.0.1 port 0 with an entry
script whose ``on_message`` waits, and talk to it with the ``websockets`` client (and a raw TCP
client for the socket server): a client that streams while its callbacks wait is served in order
instead of hitting the pending limit, and a close, an abort or a ping of a paused client is still
seen within a bounded time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import websockets
from twisted.internet.task import Clock

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.engine.backlog import LONGEST, Backlog
from connmix_tx.engine.session import MAX_PENDING, CallbackSession
from connmix_tx.testing import LogCapture
from luahelpers import Engine, make_engine
from netclients import api_call, connect, masked_frame, raw_handshake, until


# Fakes ------------------------------------------------------------------------------------------


class ReadingTransport:
    """Records whether the socket is read (``pauseProducing`` / ``resumeProducing``)."""

    def __init__(self) -> None:
        self.reading = True
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.reading = False
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.reading = True
        self.resumes += 1


class FakeReader:
    """A connection ``Backlog`` may pause; ``readable`` is what ``may_read`` answers."""

    def __init__(self) -> None:
        self.transport = ReadingTransport()
        self.readable = True

    def may_read(self) -> bool:
        return self.readable


# Backlog ----------------------------------------------------------------------------------------


def test_pause_stops_reading_and_drained_resumes_it() -> None:
    clock, reader = Clock(), FakeReader()
    backlog = Backlog(clock)
    backlog.pause(reader)
    assert not reader.transport.reading and len(backlog) == 1
    backlog.pause(reader)  # a second read with messages queued: still one pause
    assert reader.transport.pauses == 1
    backlog.drained(reader)
    assert reader.transport.reading and len(backlog) == 0
    backlog.drained(reader)  # the queue drains again later: nothing to undo
    assert reader.transport.resumes == 1


def test_a_reader_whose_queue_never_drains_is_read_again_after_longest() -> None:
    clock, reader = Clock(), FakeReader()
    backlog = Backlog(clock)
    backlog.pause(reader)
    clock.advance(LONGEST * 0.9)
    assert not reader.transport.reading
    clock.advance(LONGEST * 0.2)
    assert reader.transport.reading and len(backlog) == 0
    # Nothing is paused any more: the timer stops, and starts again with the next pause.
    assert clock.getDelayedCalls() == []
    backlog.pause(reader)
    assert not reader.transport.reading and len(clock.getDelayedCalls()) == 1
    clock.advance(LONGEST)
    assert reader.transport.reading and clock.getDelayedCalls() == []


def test_a_reader_paused_between_two_ticks_waits_at_most_twice_longest() -> None:
    clock, first, second = Clock(), FakeReader(), FakeReader()
    backlog = Backlog(clock)
    backlog.pause(first)
    clock.advance(LONGEST / 2)
    backlog.pause(second)
    clock.advance(LONGEST / 2)  # first tick: only the first is due
    assert first.transport.reading and not second.transport.reading
    clock.advance(LONGEST)
    assert second.transport.reading and len(backlog) == 0 and clock.getDelayedCalls() == []


def test_a_reader_that_may_not_read_is_not_resumed_by_drained_or_by_the_tick() -> None:
    clock, closing, other = Clock(), FakeReader(), FakeReader()
    backlog = Backlog(clock)
    backlog.pause(closing)
    backlog.pause(other)
    closing.readable = False  # e.g. a slow consumer whose reading stays off until it is dropped
    backlog.drained(closing)
    assert not closing.transport.reading and closing.transport.resumes == 0 and len(backlog) == 1
    other.readable = False
    clock.advance(LONGEST)
    assert not other.transport.reading and other.transport.resumes == 0
    assert len(backlog) == 0 and clock.getDelayedCalls() == []


def test_forget_and_stop_leave_nothing_behind() -> None:
    clock, gone, kept = Clock(), FakeReader(), FakeReader()
    backlog = Backlog(clock)
    backlog.pause(gone)
    backlog.pause(kept)
    backlog.forget(gone)  # the connection closed
    backlog.forget(gone)
    clock.advance(LONGEST)
    assert gone.transport.resumes == 0 and kept.transport.reading
    assert len(backlog) == 0 and clock.getDelayedCalls() == []
    backlog.pause(kept)
    backlog.stop()  # the server stops
    assert len(backlog) == 0 and clock.getDelayedCalls() == []
    clock.advance(LONGEST * 4)
    assert not kept.transport.reading  # its connection is being closed: not read again
    backlog.stop()


def test_many_readers_are_looked_after_by_one_timer() -> None:
    clock = Clock()
    backlog = Backlog(clock)
    readers = [FakeReader() for _ in range(1000)]
    for reader in readers:
        backlog.pause(reader)
    assert len(clock.getDelayedCalls()) == 1
    for reader in readers[::2]:
        backlog.drained(reader)
    assert len(backlog) == 500
    clock.advance(LONGEST)
    assert all(reader.transport.reading for reader in readers) and len(backlog) == 0
    assert all(reader.transport.pauses == reader.transport.resumes == 1 for reader in readers)


# CallbackSession.on_drained -----------------------------------------------------------------------

SESSION_ENTRY = """\
function on_message(msg)
  if msg.data == 'wait' then
    local v, err = mix.websocket():wait_context_value('go')
    mix.queue.push('log', 'woke ' .. tostring(v) .. ' ' .. tostring(err))
  elseif msg.data == 'later' then
    local v, err = mix.websocket():wait_context_value('go2')
    mix.queue.push('log', 'later ' .. tostring(v) .. ' ' .. tostring(err))
  else
    mix.queue.push('log', msg.data)
  end
end
function on_close(client_id, err) mix.queue.push('log', 'close ' .. tostring(err)) end
"""


def session_log(engine: Engine) -> list[str]:
    topic = engine.queues.topics.get("log")
    return [json.loads(data) for _, data in topic.messages] if topic else []


class Drains:
    """``on_drained`` calls, with what had run when each came."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[list[str]] = []

    def __call__(self) -> None:
        self.seen.append(session_log(self.engine))


def drained_session(tmp_path: Path) -> tuple[Engine, Any, CallbackSession, Drains, list[int]]:
    engine = make_engine(tmp_path, SESSION_ENTRY, topic_size=10_000)
    conn, _ = engine.connect()
    drains, overflows = Drains(engine), []
    session = CallbackSession(engine.script, conn, on_overflow=lambda: overflows.append(1),
                              on_finished=lambda: None, on_drained=drains)
    return engine, conn, session, drains, overflows


def test_on_drained_comes_when_the_last_queued_message_starts(tmp_path: Path) -> None:
    engine, conn, session, drains, _ = drained_session(tmp_path)
    for text in ("wait", "a", "b"):
        session.message(b"text", text.encode())
    assert session.pending == 2 and drains.seen == []
    conn.set_context_value("go", "now")
    # Once: just before "b" (the last queued one) ran, after "a".
    assert drains.seen == [["woke now nil", "a"]]
    assert session_log(engine) == ["woke now nil", "a", "b"] and session.pending == 0
    session.message(b"text", b"c")  # nothing queued: no drain to report
    assert len(drains.seen) == 1


def test_on_drained_comes_when_the_last_queued_message_starts_waiting(tmp_path: Path) -> None:
    engine, conn, session, drains, _ = drained_session(tmp_path)
    for text in ("wait", "a", "later"):
        session.message(b"text", text.encode())
    conn.set_context_value("go", "now")
    # "later" started (and waits in turn): the queue is empty, reading may resume.
    assert drains.seen == [["woke now nil", "a"]] and session.pending == 0
    session.message(b"text", b"b")  # queued behind "later": a new backlog
    assert session.pending == 1 and len(drains.seen) == 1
    conn.set_context_value("go2", 2)
    assert drains.seen[1] == ["woke now nil", "a", "later 2 nil"]
    assert session_log(engine) == ["woke now nil", "a", "later 2 nil", "b"]


def test_no_drain_while_messages_are_still_queued_at_the_pending_limit(tmp_path: Path) -> None:
    engine, conn, session, drains, overflows = drained_session(tmp_path)
    session.message(b"text", b"wait")
    for i in range(MAX_PENDING + 1):
        session.message(b"text", f"m{i}".encode())
    assert overflows == [1] and drains.seen == [] and session.pending == MAX_PENDING
    conn.set_context_value("go", 1)
    assert len(drains.seen) == 1 and drains.seen[0][-1] == f"m{MAX_PENDING - 2}"


def test_a_close_drops_the_queue_without_resuming_reading(tmp_path: Path) -> None:
    # on_close is queued behind the waiting callback; the drain report that comes when it starts
    # must not resume reading a closed connection (Backlog asks may_read, which says no).
    engine, conn, session, drains, _ = drained_session(tmp_path)
    clock, reader = Clock(), FakeReader()
    backlog = Backlog(clock)
    session._on_drained = lambda: backlog.drained(reader)
    for text in ("wait", "a", "b"):
        session.message(b"text", text.encode())
    backlog.pause(reader)
    reader.readable = False
    session.close("connection lost")
    conn.mark_closed()
    assert session_log(engine) == ["woke nil closed", "close connection lost"]
    assert not reader.transport.reading and len(backlog) == 0


# Integration: the real service tree ---------------------------------------------------------------

#: ``s<n>...``: wait a little (as for a back-end), then echo ``s<n>``; ``hold``: wait until the
#: API sets ``go`` (or the connection closes); anything else is recorded.
WAITING_ENTRY = """\
function on_handshake() end
function on_message(msg)
  local conn = mix.websocket()
  local d = msg.data
  if d:sub(1, 1) == 's' then
    conn:wait_context_value('never', 0.002)
    conn:send(d:sub(1, 6))
  elseif d == 'hold' then
    local v, err = conn:wait_context_value('go')
    mix.queue.push('log', 'woke ' .. tostring(v) .. ' ' .. tostring(err))
  else
    mix.queue.push('log', d)
  end
end
function on_close(client_id, err) mix.queue.push('log', 'close ' .. tostring(err)) end
"""


def entry(tmp_path: Path, source: str) -> str:
    path = tmp_path / "entry.lua"
    path.write_text(source)
    return str(path)


def engine_log(engine: Any) -> list[str]:
    topic = engine.queues.topics.get("log")
    return [json.loads(data) for _, data in topic.messages] if topic else []


class PauseCount:
    """Counts ``Backlog.pause`` calls of a running server (the test really paused reading)."""

    def __init__(self, backlog: Backlog) -> None:
        self.count = 0
        inner = backlog.pause

        def pause(reader: Any) -> None:
            self.count += 1
            inner(reader)

        backlog.pause = pause  # type: ignore[method-assign]


async def held(running: Any, ws: Any, *queued: str) -> tuple[Any, str]:
    """Send ``hold`` and ``queued`` on ``ws``; wait until the server stopped reading it."""
    engine = running.service.engine
    factory = engine.client_factories[0]
    for text in ("hold", *queued):
        await ws.send(text)
    await until(lambda: len(factory.backlog) == 1)
    (client_id,) = engine.connections.by_id
    return factory, str(client_id)


@in_asyncio
async def test_a_client_streaming_while_its_callbacks_wait_is_served_in_order(tmp_path: Path) -> None:
    # 400 messages of 4 KiB sent at once, each callback waiting a little: reading ahead would
    # queue them all and close the client at the 256 pending limit.
    count, size = 400, 4096
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_ENTRY)))
    try:
        factory = running.service.engine.client_factories[0]
        pauses = PauseCount(factory.backlog)
        with LogCapture() as logs:
            async with websockets.connect(running.client_url, ping_interval=None, max_queue=None) as ws:
                async def stream() -> None:
                    for i in range(count):
                        await ws.send(f"s{i:05d}" + "x" * (size - 6))

                sender = asyncio.ensure_future(stream())
                echoes = [await asyncio.wait_for(ws.recv(), 10) for _ in range(count)]
                await asyncio.wait_for(sender, 5)
                assert echoes == [f"s{i:05d}" for i in range(count)]
                assert ws.close_code is None
                await ws.send("done")
                await until(lambda: engine_log(running.service.engine) == ["done"])
        assert not logs.find("too many pending messages"), logs.lines
        assert pauses.count > 0  # the callbacks were behind, and reading paused
        assert len(factory.backlog) == 0
    finally:
        await running.stop()


@in_asyncio
async def test_a_client_closing_while_paused_gets_on_close_and_the_wait_returns_closed(tmp_path: Path) -> None:
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_ENTRY)))
    try:
        engine = running.service.engine
        ws = await websockets.connect(running.client_url, ping_interval=None, close_timeout=5)
        factory, _ = await held(running, ws, "a", "b")
        await asyncio.wait_for(ws.close(), 5)
        assert ws.close_code == 1000
        # The queued messages never run; the wait ends with "closed", then on_close (clean).
        await until(lambda: len(engine_log(engine)) == 2, timeout=3)
        assert engine_log(engine) == ["woke nil closed", "close nil"]
        await until(lambda: not engine.connections.by_id, timeout=3)
        assert len(factory.backlog) == 0 and not factory.open_protocols
    finally:
        await running.stop()


@in_asyncio
async def test_a_client_aborting_while_paused_gets_on_close(tmp_path: Path) -> None:
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_ENTRY)))
    try:
        engine = running.service.engine
        factory = engine.client_factories[0]
        port = engine.protocol_listeners[0].actual_port
        sock = await raw_handshake(port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"".join(masked_frame(t) for t in (b"hold", b"a", b"b")))
        await until(lambda: len(factory.backlog) == 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        await until(lambda: len(engine_log(engine)) == 2, timeout=3)
        assert engine_log(engine) == ["woke nil closed", "close connection lost"]
        await until(lambda: not engine.connections.by_id, timeout=3)
        assert len(factory.backlog) == 0
    finally:
        await running.stop()


@in_asyncio
async def test_pings_of_a_paused_client_are_answered(tmp_path: Path) -> None:
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_ENTRY)))
    try:
        engine = running.service.engine
        async with websockets.connect(running.client_url, ping_interval=None) as ws, \
                websockets.connect(running.api_url) as api:
            factory, client_id = await held(running, ws, "a")
            for i in range(3):
                pong = await ws.ping(f"p{i}".encode())
                await asyncio.wait_for(pong, 3)
            assert engine_log(engine) == []  # still waiting: the ping did not run anything
            reply = await api_call(api, "conn.call", [{"client_id": client_id, "func": "set_context_value",
                                                       "args": ["go", "now"]}])
            assert reply["error"] is None, reply
            await until(lambda: engine_log(engine) == ["woke now nil", "a"])
            await ws.send("after")
            await until(lambda: engine_log(engine)[-1:] == ["after"])
            assert ws.close_code is None
    finally:
        await running.stop()


@in_asyncio
async def test_a_server_side_close_of_a_paused_client_is_clean(tmp_path: Path) -> None:
    # The API closes a client whose callback waits with messages queued: the engine sends its
    # close frame and must read the client's answer to end cleanly (on_close gets nil), not
    # leave reading off until Autobahn's close-handshake timeout drops the connection.
    running = await start_engine(loopback_config(entry=entry(tmp_path, WAITING_ENTRY)))
    try:
        engine = running.service.engine
        async with websockets.connect(running.api_url) as api:
            ws = await websockets.connect(running.client_url, ping_interval=None, close_timeout=5)
            factory, client_id = await held(running, ws, "a", "b")
            reply = await api_call(api, "conn.call", [{"client_id": client_id, "func": "close", "args": []}])
            assert reply["error"] is None, reply
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1000
            await until(lambda: len(engine_log(engine)) == 2, timeout=3)
            assert engine_log(engine) == ["woke nil closed", "close nil"]
            await until(lambda: not engine.connections.by_id, timeout=3)
    finally:
        await running.stop()


# The socket server ------------------------------------------------------------------------------

SOCKET_ENTRY = """\
function on_connect(client_id) end
function protocol_input(buf)
  local i = buf:tostring():find('\\n', 1, true)
  return i or 0
end
function protocol_decode(packet) return packet:sub(1, -2) end
function protocol_encode(data) return data .. '\\n' end
function on_message(line)
  local conn = mix.socket.tcp()
  if line:sub(1, 1) == 's' then
    conn:wait_context_value('never', 0.002)
    conn:send(line:sub(1, 6) .. '\\n')
  elseif line == 'hold' then
    local v, err = conn:wait_context_value('go')
    mix.queue.push('log', 'woke ' .. tostring(v) .. ' ' .. tostring(err))
  else
    mix.queue.push('log', line)
  end
end
function on_close(client_id, err) mix.queue.push('log', 'close ' .. tostring(err)) end
"""


def socket_config(tmp_path: Path) -> Any:
    return loopback_config(protocol="socket", entry=entry(tmp_path, SOCKET_ENTRY))


@in_asyncio
async def test_socket_client_streaming_while_its_callbacks_wait_is_served_in_order(tmp_path: Path) -> None:
    count, size = 400, 4096
    running = await start_engine(socket_config(tmp_path))
    try:
        factory = running.service.engine.client_factories[0]
        pauses = PauseCount(factory.backlog)
        port = running.service.engine.protocol_listeners[0].actual_port
        with LogCapture() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def stream() -> None:
                for i in range(count):
                    writer.write(f"s{i:05d}".encode() + b"x" * (size - 7) + b"\n")
                    await writer.drain()

            sender = asyncio.ensure_future(stream())
            lines = [await asyncio.wait_for(reader.readline(), 10) for _ in range(count)]
            await asyncio.wait_for(sender, 5)
            assert lines == [f"s{i:05d}\n".encode() for i in range(count)]
            writer.write(b"done\n")
            await writer.drain()
            await until(lambda: engine_log(running.service.engine) == ["done"])
            writer.close()
            await until(lambda: engine_log(running.service.engine)[-1:] == ["close nil"])
        assert not logs.find("too many pending messages"), logs.lines
        assert pauses.count > 0 and len(factory.backlog) == 0
    finally:
        await running.stop()


@pytest.mark.parametrize("how", ["eof", "rst"])
@in_asyncio
async def test_socket_client_leaving_while_paused_gets_on_close(tmp_path: Path, how: str) -> None:
    running = await start_engine(socket_config(tmp_path))
    try:
        engine = running.service.engine
        factory = engine.client_factories[0]
        port = engine.protocol_listeners[0].actual_port
        sock = await connect(port)
        await asyncio.get_running_loop().sock_sendall(sock, b"hold\na\nb\n")
        await until(lambda: len(factory.backlog) == 1)
        if how == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await until(lambda: len(engine_log(engine)) == 2, timeout=3)
        err = "nil" if how == "eof" else "connection lost"
        assert engine_log(engine) == ["woke nil closed", f"close {err}"]
        await until(lambda: not engine.connections.by_id, timeout=3)
        assert len(factory.backlog) == 0
    finally:
        await running.stop()

