"""Hot reload (docs/lua-api.md, "Hot reload") with a ``Clock``: ``HotReloader`` over a real
``Script``.

Files are edited on disk; every edit also moves the modification time forward, so a change is
seen even when the size stays the same and the file system's clock is coarse.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from twisted.logger import formatEvent, globalLogPublisher

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.lua.reload import HotReloader
from luahelpers import STUBS, Engine, make_engine, write_entry


V1 = """
function helper() return "old" end
function on_message(msg)
  if msg.data == "wait" then
    local v = mix.websocket():wait_context_value("go")
    return helper() .. ":" .. v
  end
  return helper()
end
"""


def edit(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its modification time forward by one second."""
    before = path.stat().st_mtime
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    os.utime(path, (before + 1, before + 1))


def entry_v(version: str, extra: str = "") -> str:
    return V1.replace('"old"', f'"{version}"') + extra + STUBS


@pytest.fixture
def logs() -> Iterator[list[tuple[str, str]]]:
    """(level, text) of the events logged in namespace connmix.lua while the test runs."""
    events: list[tuple[str, str]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "connmix.lua":
            events.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return make_engine(tmp_path, V1)


@pytest.fixture
def entry(engine: Engine) -> Path:
    return Path(engine.script.entry)


@pytest.fixture
def reloader(engine: Engine) -> Iterator[HotReloader]:
    reloader = HotReloader(engine.script, engine.clock, 10)
    reloader.start()
    yield reloader
    reloader.stop()


def answer(engine: Engine, data: str = "hi") -> Any:
    conn, _ = engine.connect()
    return engine.message(conn, data).values[0]


def test_an_edit_is_used_for_callbacks_started_afterwards(
    engine: Engine, entry: Path, reloader: HotReloader, logs: list
) -> None:
    assert answer(engine) == b"old"
    edit(entry, entry_v("new"))
    engine.clock.advance(9)
    assert answer(engine) == b"old"  # not checked yet
    engine.clock.advance(1)
    assert answer(engine) == b"new"
    assert ("info", "lua reloaded lua/entry.lua") in logs


def test_a_suspended_callback_finishes_with_the_old_code(
    engine: Engine, entry: Path, reloader: HotReloader
) -> None:
    conn, _ = engine.connect()
    suspended = engine.message(conn, "wait")
    assert not suspended.finished and engine.script.waiting == 1
    edit(entry, entry_v("new"))
    engine.clock.advance(10)
    assert answer(engine) == b"new"
    conn.set_context_value("go", "now")
    assert suspended.values == (b"old:now",)


def test_state_outside_lua_is_untouched(engine: Engine, entry: Path, reloader: HotReloader) -> None:
    conn, _ = engine.connect()
    engine.message(conn, "hi")
    conn.set_context_value("user", "bob")
    edit(entry, "function on_message(msg) return mix.websocket():context_value('user') end\n" + STUBS)
    engine.clock.advance(10)
    assert engine.message(conn, "x").values == (b"bob",)


@pytest.mark.parametrize("broken, message", [
    ("function on_message(msg)\n  return 'x' +\nend\n" + STUBS, "lua/entry.lua:3: unexpected symbol near 'end'"),
    ("local x = nil\nx.field = 1\n" + STUBS, "lua/entry.lua:2: attempt to index local 'x' (a nil value)"),
    ("function on_handshake() end\nfunction on_close() end\n", "lua/entry.lua: callback on_message is missing"),
])
def test_a_broken_edit_keeps_the_old_code_and_logs_file_and_line(
    engine: Engine, entry: Path, reloader: HotReloader, logs: list, broken: str, message: str
) -> None:
    edit(entry, broken)
    engine.clock.advance(10)
    assert answer(engine) == b"old"
    errors = [text for level, text in logs if level == "error"]
    assert errors == [f"lua reload failed lua/entry.lua: {message}"]


def test_a_broken_version_is_not_retried_until_the_files_change_again(
    engine: Engine, entry: Path, reloader: HotReloader, logs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiles = []
    original = engine.script.compile
    monkeypatch.setattr(engine.script, "compile", lambda: compiles.append(1) or original())
    edit(entry, "this is not lua\n" + STUBS)
    engine.clock.advance(10)
    engine.clock.advance(10)
    engine.clock.advance(10)
    assert len(compiles) == 1
    assert len([1 for level, _ in logs if level == "error"]) == 1
    edit(entry, entry_v("fixed"))
    engine.clock.advance(10)
    assert len(compiles) == 2 and answer(engine) == b"fixed"
    engine.clock.advance(10)
    assert len(compiles) == 2  # nothing changed since


def test_unchanged_files_are_not_recompiled(
    engine: Engine, entry: Path, reloader: HotReloader, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiles = []
    original = engine.script.compile
    monkeypatch.setattr(engine.script, "compile", lambda: compiles.append(1) or original())
    for _ in range(5):
        engine.clock.advance(10)
    assert compiles == []
    edit(entry, entry_v("new"))  # the poll kept running all along: a change is still seen
    engine.clock.advance(10)
    assert compiles == [1] and answer(engine) == b"new"


def test_a_module_change_triggers_a_reload(tmp_path: Path, logs: list) -> None:
    source = "local util = require('util')\nfunction on_message(msg) return util.word() end\n"
    folder = tmp_path / "lua"
    folder.mkdir()
    module = folder / "util.lua"
    module.write_text("return { word = function() return 'one' end }\n")
    engine = make_engine(tmp_path, source)
    reloader = HotReloader(engine.script, engine.clock, 5)
    reloader.start()
    assert str(module) in engine.script.files
    assert answer(engine) == b"one"
    edit(module, "return { word = function() return 'two' end }\n")
    engine.clock.advance(5)
    assert answer(engine) == b"two"
    assert ("info", "lua reloaded lua/entry.lua") in logs


def test_a_module_required_inside_a_callback_is_watched_too(tmp_path: Path) -> None:
    source = "function on_message(msg) return require('late').value end\n"
    folder = tmp_path / "lua"
    folder.mkdir()
    module = folder / "late.lua"
    module.write_text("return { value = 'first' }\n")
    engine = make_engine(tmp_path, source)
    reloader = HotReloader(engine.script, engine.clock, 5)
    reloader.start()
    assert answer(engine) == b"first"
    assert str(module) in engine.script.files
    edit(module, "return { value = 'second' }\n")
    engine.clock.advance(5)
    assert answer(engine) == b"second"


def test_a_deleted_entry_keeps_the_old_code(engine: Engine, entry: Path, reloader: HotReloader, logs: list) -> None:
    entry.unlink()
    engine.clock.advance(10)
    assert answer(engine) == b"old"
    assert [text for level, text in logs if level == "error"][0].startswith(
        "lua reload failed lua/entry.lua: cannot read ")


def test_interval_zero_means_off(engine: Engine, entry: Path) -> None:
    reloader = HotReloader(engine.script, engine.clock, 0)
    reloader.start()
    assert engine.clock.getDelayedCalls() == []
    edit(entry, entry_v("new"))
    engine.clock.advance(1000)
    assert answer(engine) == b"old"


def test_set_interval_restarts_the_timer(engine: Engine, entry: Path, reloader: HotReloader) -> None:
    engine.clock.advance(8)
    reloader.set_interval(3)  # a SIGHUP with a new byteCodeExpires
    edit(entry, entry_v("new"))
    engine.clock.advance(2)
    assert answer(engine) == b"old"
    engine.clock.advance(1)
    assert answer(engine) == b"new"
    reloader.set_interval(0)
    assert engine.clock.getDelayedCalls() == []
    edit(entry, entry_v("newer"))
    engine.clock.advance(100)
    assert answer(engine) == b"new"
    reloader.set_interval(4)
    engine.clock.advance(4)
    assert answer(engine) == b"newer"


def test_stop_ends_polling(engine: Engine, entry: Path, reloader: HotReloader) -> None:
    reloader.stop()
    assert engine.clock.getDelayedCalls() == []
    reloader.set_interval(5)  # a SIGHUP after stop does not start it again
    assert engine.clock.getDelayedCalls() == []


# --- wired into the engine ----------------------------------------------------------------------


@in_asyncio
async def test_the_running_engine_reloads_an_edited_entry(tmp_path: Path) -> None:
    entry = write_entry(tmp_path, "function on_message(msg) mix.websocket():send('v1') end\n")
    running = await start_engine(loopback_config(entry=str(entry), byte_code_expires=1))
    try:
        reloaders = running.service.engine.reloaders
        assert [r.interval for r in reloaders] == [1] and reloaders[0].script is running.service.engine.scripts[0]
        async with websockets.connect(running.client_url) as ws:
            await ws.send("x")
            assert await asyncio.wait_for(ws.recv(), 5) == "v1"
            edit(entry, "function on_message(msg) mix.websocket():send('v2') end\n" + STUBS)
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                await ws.send("x")
                if await asyncio.wait_for(ws.recv(), 5) == "v2":
                    break
                assert asyncio.get_running_loop().time() < deadline, "never reloaded"
                await asyncio.sleep(0.1)
    finally:
        await running.stop()
    assert not reloaders[0]._loop.running
