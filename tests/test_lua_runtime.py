"""Tests for connmix_tx.lua.runtime and bootstrap.lua: loading, sandbox, require, limits, waiting.

docs/lua-api.md: "The runtime" (require, print, sandbox, limits), "Callbacks" (required ones),
"Coroutines and waiting", "Errors" (errors name file:line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogLevel, globalLogPublisher

from connmix_tx.lua.runtime import Script, ScriptError
from luahelpers import EXEC_ENTRY, Engine, make_engine, write_entry


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    """A websocket script whose on_message runs the message text as Lua."""
    return make_engine(tmp_path)


def lua(engine: Engine, code: str) -> tuple:
    """Run ``code`` inside on_message (no connection) and return what it returned."""
    return engine.message(None, code).values


@pytest.fixture
def lua_logs() -> Iterator[list[dict[str, Any]]]:
    """Events logged in namespace connmix.lua while the test runs."""
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "connmix.lua":
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


# --- loading (callbacks, chunk names) ---------------------------------------------------------


def test_missing_required_callback_is_named(tmp_path: Path) -> None:
    source = "function on_handshake() end\nfunction on_message() end\n"
    with pytest.raises(ScriptError, match="lua/entry.lua: callback on_close is missing"):
        make_engine(tmp_path, source, stubs=False)


def test_callback_that_is_not_a_function(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match=r"callback on_message is not a function \(number\)"):
        make_engine(tmp_path, "on_message = 5\n")


def test_socket_server_requires_framing_callbacks(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="callback on_connect is missing"):
        make_engine(tmp_path, "", kind="socket")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    source = "function on_message(msg)\n  local x = 1\n  x = = 2\nend\n"
    with pytest.raises(ScriptError, match=r"^lua/entry\.lua:3: "):
        make_engine(tmp_path, source)


def test_error_raised_while_loading(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match=r"^lua/entry\.lua:2: boom$"):
        make_engine(tmp_path, "local x = 1\nerror('boom')\n")


def test_unreadable_entry(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, load=False)
    (tmp_path / "lua" / "entry.lua").unlink()
    with pytest.raises(ScriptError, match="cannot read"):
        engine.script.load()


def test_runtime_error_in_callback_names_file_and_line(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "function on_message(msg)\n  local t = nil\n  return t.x\nend\n")
    assert engine.message(None, "x").error.startswith("lua/entry.lua:3: attempt to index")


# --- sandbox ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "io", "os.execute", "os.exit", "os.getenv", "os.remove", "os.rename", "os.tmpname",
    "os.setlocale", "dofile", "loadfile", "module", "package", "debug.getinfo", "debug.sethook",
    "debug.getlocal", "getfenv", "setfenv", "newproxy", "jit", "ffi", "string.dump",
    "('').dump", "python", "host", "engine",
])
def test_removed_from_the_sandbox(engine: Engine, name: str) -> None:
    assert lua(engine, f"return {name} == nil") == (True,)


@pytest.mark.parametrize("name", [
    "os.time", "os.clock", "os.date", "os.difftime", "debug.traceback", "bit.band", "bit.tohex",
    "string.format", "table.concat", "math.floor", "coroutine.wrap", "xpcall", "unpack",
    "rawget", "setmetatable", "mix.json_encode", "require",
])
def test_kept_in_the_sandbox(engine: Engine, name: str) -> None:
    assert lua(engine, f"return type({name})") == (b"function",)


def test_environment_basics(engine: Engine) -> None:
    code = "return _VERSION, _G.mix == mix, _G.io, getmetatable('').__index == string"
    assert lua(engine, code) == (b"Lua 5.1", True, None, True)
    assert lua(engine, "return bit.band(0xff, 0x0f), require('bit') == bit") == (15, True)


def test_loadstring_of_text_runs_in_the_sandbox(engine: Engine) -> None:
    assert lua(engine, "return loadstring('return 1 + 1, io == nil, type(mix)')()") == (2, True, b"table")
    assert lua(engine, "return load(function() return nil end) ~= nil") == (True,)


def test_binary_chunks_are_refused(engine: Engine) -> None:
    fn, err = lua(engine, r"return loadstring('\27LJ\2\0\9bytecode')")
    assert fn is None and b"binary chunks are not allowed" in err
    fn, err = lua(engine, r"return load('\27LJ\2\0\9bytecode')")
    assert fn is None and b"binary" in err
    fn, err = lua(engine, "return load('return 1', 'x', 'b')")
    assert fn is None and b"only text chunks" in err
    reader = r"local parts = {'\27LJ', '\2'} return load(function() return table.remove(parts, 1) end)"
    fn, err = lua(engine, reader)
    assert fn is None and b"binary" in err


def test_collectgarbage_count_only(engine: Engine) -> None:
    (count,) = lua(engine, "return collectgarbage('count')")
    assert isinstance(count, float) and count > 0
    ok, err = lua(engine, "return pcall(collectgarbage, 'collect')")
    assert ok is False and b"only \"count\"" in err
    assert lua(engine, "return pcall(collectgarbage)")[0] is False


def test_a_script_changing_string_does_not_break_reloads(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "string.find = nil\n" + EXEC_ENTRY)
    write_entry(tmp_path, EXEC_ENTRY)  # the file is fixed; the hot reload compiles it again
    engine.script.use(engine.script.compile())
    assert lua(engine, "return 'reloaded'") == (b"reloaded",)


def test_python_attributes_are_not_reachable(engine: Engine) -> None:
    for expression in ("mix.base64_encode.__class__", "mix.base64_encode.__globals__",
                       "mix.base64_decode.__call__"):
        ok, _ = lua(engine, f"return pcall(function() return {expression} end)")
        assert ok is False, expression


# --- require ----------------------------------------------------------------------------------


def write_module(tmp_path: Path, name: str, source: str) -> None:
    path = tmp_path / "lua" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")


def test_require_loads_modules_from_the_entry_folder(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    write_module(tmp_path, "utils/x.lua", "loads = (loads or 0) + 1\nreturn {value = 42}\n")
    write_module(tmp_path, "pkg/init.lua", "return 'from init'\n")
    assert lua(engine, "return require('utils.x').value, require('utils/x').value") == (42, 42)
    assert lua(engine, "return require('pkg')") == (b"from init",)
    twice = "local a, b = require('utils.x'), require('utils.x') return a == b, loads"
    assert lua(engine, twice) == (True, 2)


def test_modules_are_loaded_once_per_name(tmp_path: Path) -> None:
    write_module(tmp_path, "counted.lua", "loads = (loads or 0) + 1\n")
    engine = make_engine(tmp_path, "require('counted')\n" + EXEC_ENTRY)
    assert lua(engine, "require('counted') require('counted') return loads") == (1,)
    assert str(tmp_path / "lua" / "counted.lua") in engine.script.files


@pytest.mark.parametrize("name", ["../outside", "./../outside", "utils/../../outside", "/etc/passwd",
                                  "..outside", ".."])
def test_require_outside_the_entry_folder_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.lua").write_text("return 1\n")
    engine = make_engine(tmp_path)
    assert lua(engine, f"return pcall(require, {name!r})") == (
        False, f"module '{name}' is outside the lua folder".encode())


def test_require_errors_name_the_module(tmp_path: Path) -> None:
    write_module(tmp_path, "utils/bad.lua", "local x = nil\nreturn x.y\n")
    engine = make_engine(tmp_path)
    ok, err = lua(engine, "return pcall(require, 'utils.bad')")
    assert ok is False and err.startswith(b"lua/utils/bad.lua:2: attempt to index")
    ok, err = lua(engine, "return pcall(require, 'nope')")
    assert ok is False and b"module 'nope' not found" in err
    assert lua(engine, "return pcall(require, 'ffi')")[0] is False


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    "while true do end",
    "while true do pcall(function() while true do end end) end",
])
def test_instruction_limit_stops_the_callback(tmp_path: Path, body: str) -> None:
    engine = make_engine(tmp_path, max_instructions=100_000)
    assert engine.message(None, body).error.endswith("instruction limit exceeded")
    assert lua(engine, "return 'still usable'") == (b"still usable",)


def test_instruction_limit_allows_normal_work(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_instructions=100_000)
    assert lua(engine, "local n = 0 for i = 1, 1000 do n = n + i end return n") == (500500,)
    assert lua(engine, "return 1") == (1,)


def test_instruction_limit_in_a_framing_callback(tmp_path: Path) -> None:
    source = """
        function on_connect() end
        function on_close() end
        function on_message() end
        function protocol_input(buf) while true do end end
        function protocol_decode(s) return s end
        function protocol_encode(s) return s end
    """
    engine = make_engine(tmp_path, source, kind="socket", stubs=False, max_instructions=100_000)
    with pytest.raises(ScriptError, match="instruction limit exceeded"):
        engine.script.call_protocol("protocol_input", b"1", b"buf")
    assert engine.script.call_protocol("protocol_decode", b"1", b"ok") == (b"ok",)


@pytest.mark.parametrize("body", [
    "local s = string.rep('x', 64 * 1024 * 1024)",
    "local t = {} for i = 1, 1e8 do t[i] = i end",
])
def test_memory_limit_fails_the_callback_only(tmp_path: Path, body: str) -> None:
    engine = make_engine(tmp_path, max_memory_mib=16)
    assert "not enough memory" in engine.message(None, body).error
    assert lua(engine, "return string.rep('y', 1024):len()") == (1024,)


# --- coroutines and waiting -------------------------------------------------------------------


class Waits:
    """Stands in for a waiting host function (``mix.mesh.send``): each call waits on a Deferred."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.deferreds: list[Deferred] = []
        self.ready: tuple | None = None  # when set, the Deferred has fired before the yield

    def __call__(self, cid: bytes | None, target: object, data: object, kind: object = None) -> tuple:
        assert self.script is not None
        d: Deferred = succeed(self.ready) if self.ready is not None else Deferred()
        self.deferreds.append(d)
        return self.script.wait(d)


def waiting_engine(tmp_path: Path, source: str = EXEC_ENTRY, **overrides: Any) -> tuple[Engine, Waits]:
    """An engine whose ``mix.mesh.send`` always waits on a Deferred the test controls."""
    host = Waits()
    engine = make_engine(tmp_path, source, overrides={"mesh_send": host, **overrides}, load=False)
    host.script = engine.script
    engine.script.load()
    return engine, host


@pytest.fixture
def waits(tmp_path: Path) -> tuple[Engine, Waits]:
    return waiting_engine(tmp_path)


def test_wait_suspends_until_the_deferred_fires(waits: tuple[Engine, Waits]) -> None:
    engine, host = waits
    outcome = engine.message(None, "local a, b = mix.mesh.send('1', 'x') return 'resumed', a, b")
    assert not outcome.finished and engine.script.waiting == 1
    host.deferreds[0].callback((b"value", 2))
    assert outcome.values == (b"resumed", b"value", 2)
    assert engine.script.waiting == 0


def test_deferred_fired_before_the_yield(waits: tuple[Engine, Waits]) -> None:
    engine, host = waits
    host.ready = (b"now",)
    assert lua(engine, "return mix.mesh.send('1', 'x')") == (b"now",)
    assert engine.script.waiting == 0


def test_errback_becomes_nil_and_message(waits: tuple[Engine, Waits]) -> None:
    engine, host = waits
    outcome = engine.message(None, "return mix.mesh.send('1', 'x')")
    host.deferreds[0].errback(RuntimeError("link lost"))
    assert outcome.values == (None, b"link lost")


def test_waiting_counts_suspended_coroutines(waits: tuple[Engine, Waits]) -> None:
    engine, host = waits
    a, _ = engine.connect()
    b, _ = engine.connect()
    first = engine.message(a, "return mix.mesh.send('1', 'x')")
    second = engine.message(b, "return mix.websocket():client_id(), mix.mesh.send('1', 'x')")
    assert engine.script.waiting == 2
    host.deferreds[1].callback((b"second",))
    assert second.values == (b.cid, b"second") and not first.finished
    assert engine.script.waiting == 1
    host.deferreds[0].callback((b"first",))
    assert first.values == (b"first",) and engine.script.waiting == 0


def test_resume_is_never_nested_in_another_callback(tmp_path: Path) -> None:
    def publish(cid: bytes | None, channel: object, data: object, kind: object = None) -> tuple:
        host.deferreds[0].callback((b"late",))  # fires while another callback runs
        return 0, 1, 0

    engine, host = waiting_engine(tmp_path, mesh_publish=publish)
    waiting = engine.message(None, "return mix.mesh.send('1', 'x')")
    other = engine.message(None, "return 'other', mix.mesh.publish('ch', 'x')")
    assert other.values == (b"other", 1, 0)
    assert not waiting.finished
    engine.clock.advance(0)
    assert waiting.values == (b"late",)


def test_cannot_wait_at_the_top_level(tmp_path: Path) -> None:
    source = "top_ok, top_err = pcall(mix.mesh.send, '1', 'x')\n" + EXEC_ENTRY
    engine, _ = waiting_engine(tmp_path, source)
    ok, err = lua(engine, "return top_ok, top_err")
    assert ok is False and err.endswith(b"cannot wait here")
    assert engine.script.waiting == 0


def test_waiting_at_the_top_level_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="cannot wait here"):
        waiting_engine(tmp_path, "local ws = mix.websocket()\nmix.mesh.send('1', 'x')\n")


def test_cannot_wait_here_names_the_calling_line(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match=r"^lua/entry\.lua:2: cannot wait here$"):
        waiting_engine(tmp_path, "local ws = mix.websocket()\nmix.mesh.send('1', 'x')\n")


def test_cannot_wait_in_a_script_coroutine(waits: tuple[Engine, Waits]) -> None:
    engine, _ = waits
    code = """
        local co = coroutine.create(function() return mix.mesh.send('1', 'x') end)
        return coroutine.resume(co)
    """
    ok, err = lua(engine, code)
    assert ok is False and err.endswith(b"cannot wait here")
    assert engine.script.waiting == 0


def test_bare_yield_resumes_on_the_next_clock_turn(engine: Engine) -> None:
    outcome = engine.message(None, "local got = coroutine.yield(5) return 'after', got")
    assert not outcome.finished
    engine.clock.advance(0)
    assert outcome.values == (b"after", None)


def test_script_coroutines_work(engine: Engine) -> None:
    code = """
        local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end)
        return gen() + gen() + gen()
    """
    assert lua(engine, code) == (6,)


# --- print and logging ------------------------------------------------------------------------


def test_print_logs_info_with_client_id(engine: Engine, lua_logs: list[dict[str, Any]]) -> None:
    conn, _ = engine.connect()
    engine.message(conn, "print('a', 1, nil, true)").values
    (event,) = lua_logs
    assert event["log_level"] == LogLevel.info
    assert event["msg"] == "a\t1\tnil\ttrue"
    assert event["client_id"] == str(conn.client_id)
    assert event["entry"] == "lua/entry.lua"


def test_print_at_load_time_has_no_client_id(tmp_path: Path, lua_logs: list[dict[str, Any]]) -> None:
    make_engine(tmp_path, "print('loading')\n")
    (event,) = lua_logs
    assert event["msg"] == "loading" and "client_id" not in event


def test_mix_log_levels(engine: Engine, lua_logs: list[dict[str, Any]]) -> None:
    conn, _ = engine.connect()
    code = "return mix.log(mix.WARN, 'careful'), mix.log('debug', 5)"
    assert engine.message(conn, code).values == (True, True)
    logged = [(e["log_level"], e["msg"]) for e in lua_logs]
    assert logged == [(LogLevel.warn, "careful"), (LogLevel.debug, "5")]
    assert all(e["client_id"] == str(conn.client_id) for e in lua_logs)
    ok, err = lua(engine, "return pcall(mix.log, 'loud', 'x')")
    assert ok is False and b"unknown level" in err


def test_log_after_a_wait_keeps_the_client_id(
    waits: tuple[Engine, Waits], lua_logs: list[dict[str, Any]]
) -> None:
    engine, host = waits
    a, _ = engine.connect()
    b, _ = engine.connect()
    engine.message(a, "mix.mesh.send('1', 'x') print('a again')")
    engine.message(b, "print('b')").values
    host.deferreds[0].callback(())
    assert [(e["msg"], e["client_id"]) for e in lua_logs] == [
        ("b", str(b.client_id)), ("a again", str(a.client_id))]
