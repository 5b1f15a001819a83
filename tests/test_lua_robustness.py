"""What a script cannot do to the runtime it runs in (docs/robustness.md, "Lua scripts").

Each observation of issue 11 as a test.  The ones that used to abort, freeze or crash the
process run in a child process with a time bound, so a regression fails the test instead of
killing pytest: the child wires a real ``Script`` (``luahelpers.make_engine``), runs the given
messages through ``on_message`` (the message text is Lua) and prints one JSON line per outcome.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from connmix_tx.engine.session import CallbackSession
from connmix_tx.lua.reload import HotReloader
from luahelpers import STUBS, make_engine

TESTS = Path(__file__).resolve().parent

CHILD = r"""
import json, pathlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
from luahelpers import make_engine, EXEC_ENTRY
args = json.loads(sys.argv[2])
tmp = pathlib.Path(tempfile.mkdtemp())
engine = make_engine(tmp, source=args.get("entry", EXEC_ENTRY), max_memory_mib=args["memory"],
                     max_instructions=args["instructions"])
conn, transport = engine.connect()
for callback, code in args["runs"]:
    if callback == "on_message":
        outcome = engine.message(conn, code)
    else:
        outcome = engine.run(callback, conn, code.encode())
    engine.clock.advance(0)
    ok, value = outcome.calls[0] if outcome.calls else (None, "unfinished")
    if isinstance(value, tuple):
        value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
        value = [v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for v in value]
    print(json.dumps([ok, value]), flush=True)
"""


def child(*messages: str, memory: int = 32, instructions: int = 0, entry: str | None = None,
          runs: list[tuple[str, str]] | None = None, timeout: float = 60) -> list[list[Any]]:
    """Outcomes ``[ok, value]`` of ``messages`` in a fresh child; fails when the child dies."""
    spec: dict[str, Any] = {
        "memory": memory, "instructions": instructions,
        "runs": runs if runs is not None else [("on_message", m) for m in messages],
    }
    if entry is not None:
        spec["entry"] = textwrap.dedent(entry) + STUBS
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"child died ({result.returncode}):\n{result.stderr[-2000:]}"
    return [json.loads(line) for line in result.stdout.splitlines()]


ALIVE = "return 1 + 1"


def test_the_memory_limit_is_split_between_script_and_engine(tmp_path: Path) -> None:
    # Everything below relies on it; a lupa whose layout differs would silently lose it.
    engine = make_engine(tmp_path, max_memory_mib=16)
    assert engine.script.memory_split
    error = engine.message(None, "local t = {} while true do t[#t + 1] = {} end").error
    assert error == "not enough memory"
    # The script stopped at its budget: the headroom above it stayed for the engine.
    assert engine.script.runtime.get_memory_used() < 17 * 1024 * 1024
ENOMEM = "not enough memory"


# --- 1. allocation failures -------------------------------------------------------------------


@pytest.mark.parametrize("code", [
    "local t = {} while true do t[#t + 1] = {} end",
    "local t = {} while true do t[#t + 1] = coroutine.create(function() end) end",
    "local t = {} while true do local v = #t t[#t + 1] = function() return v end end",
    "local t = {} local i = 0 while true do i = i + 1 t[i] = ('x'):rep(1000) .. i end",
    "local s = 'x' while true do s = s .. s end",
])
@pytest.mark.parametrize("wrap", ["{}", "pcall(function() {} end)", "pcall(coroutine.wrap(function() {} end))"])
def test_allocating_until_the_limit_fails_the_callback_and_the_next_one_runs(code: str, wrap: str) -> None:
    first, second = child(wrap.format(code), ALIVE)
    if wrap == "{}":
        assert first[0] is False and ENOMEM in first[1]
    assert second == [True, [2]]


def test_on_handshake_allocating_until_the_limit_fails_and_the_runtime_serves() -> None:
    entry = "function on_handshake(code) assert(loadstring(code))() end\n" \
            "function on_message(msg) return assert(loadstring(msg.data))() end\n"
    outcomes = child(entry=entry, runs=[
        ("on_handshake", "local t = {} while true do t[#t + 1] = {} end"),
        ("on_handshake", "pcall(function() local t = {} while true do t[#t + 1] = {} end end)"),
        ("on_message", ALIVE),
    ])
    assert outcomes[0][0] is False and ENOMEM in outcomes[0][1]
    assert outcomes[2] == [True, [2]]


def test_a_global_filled_under_pcall_gives_later_callbacks_a_clean_error() -> None:
    fills = [
        "H = {} pcall(function() while true do H[#H + 1] = {} end end)",
        "H = {} pcall(function() local i = 0 while true do i = i + 1 H[i] = ('y'):rep(100) .. i end end)",
    ]
    entry = "function on_message(msg) if msg.data == 'drop' then H = nil return end " \
            "return assert(loadstring(msg.data))() end\n"
    for fill in fills:
        outcomes = child(fill, ALIVE, ALIVE, "drop", ALIVE, ALIVE, entry=entry)
        assert outcomes[0][0] is True
        # The global stays (the script's business): later callbacks run or fail cleanly; once
        # the script dropped it, a failure collects and the runtime serves again.
        for later in outcomes[1:3] + outcomes[4:5]:
            assert later == [True, [2]] or (later[0] is False and ENOMEM in later[1])
        assert outcomes[5] == [True, [2]]


@pytest.mark.parametrize("code", [
    "return mix.str_split(('a,'):rep(6e6), ',')",
    "return mix.json_decode('[' .. ('[],'):rep(2e6) .. '[]]')",
    "return mix.json_decode('[' .. ('\"abcdefgh\",'):rep(1e6) .. '1]')",
    "return mix.php_unpack('C*', ('a'):rep(2e7))",
    "local t = {} local i = 0 while true do i = i + 1 t[i] = mix.str_split(('a,'):rep(1e4) .. i, ',') end",
    "local t = {} local i = 0 while true do i = i + 1 t[i] = mix.base64_decode(mix.base64_encode(('x'):rep(1e5) .. i)) end",
])
def test_host_functions_refuse_results_beyond_the_budget(code: str) -> None:
    first, again, second = child(code, f"pcall(function() {code} end)", ALIVE)
    assert first[0] is False and ENOMEM in first[1]
    assert second == [True, [2]]


def test_deep_coroutine_nesting_is_a_lua_error() -> None:
    outcomes = child(
        "local function f() coroutine.resume(coroutine.create(f)) end f()",
        "local function f() return coroutine.wrap(f)() end return f()",
        ALIVE,
    )
    assert outcomes[0] == [True, [None]]  # each resume returned false, nothing crashed
    assert outcomes[1][0] is False and "coroutines nested deeper than 64" in outcomes[1][1]
    assert outcomes[2] == [True, [2]]


# --- 2. everything the engine runs is bounded -------------------------------------------------


@pytest.mark.parametrize("tostring_body, text", [
    ("while true do end", "(error object is a table value)"),
    ("error('again')", "(error object is a table value)"),
    ("local t = {} while true do t[#t + 1] = {} end", "(error object is a table value)"),
    ("return {}", "(error object is a table value)"),
    ("return 'custom text'", "custom text"),
])
def test_error_objects_are_converted_under_the_limits(tostring_body: str, text: str) -> None:
    code = f"error(setmetatable({{}}, {{__tostring = function() {tostring_body} end}}))"
    outcomes = child(code, ALIVE, instructions=1_000_000, timeout=30)
    assert outcomes == [[False, text], [True, [2]]]


def test_backtracking_patterns_are_refused() -> None:
    outcomes = child(
        "return string.find(('a'):rep(40), ('a*'):rep(20) .. 'b')",
        "return (('a'):rep(5000)):gsub(('a?a*'):rep(8) .. 'b', '')",
        "return ('  trim me  '):match('^%s*(.-)%s*$')",
        "return select(2, ('a b c'):gsub('%s+', ''))",
        instructions=1_000_000, timeout=30,
    )
    assert outcomes[0][0] is False and "pattern too complex" in outcomes[0][1]
    assert outcomes[1][0] is False and "pattern too complex" in outcomes[1][1]
    assert outcomes[2] == [True, ["trim me"]]
    assert outcomes[3] == [True, [2]]


@pytest.mark.parametrize("use", [
    "return mix.json_encode(x)",
    "mix.websocket():set_context_value('k', x)",
    "mix.websocket():set_context({k = x})",
    "return mix.queue.push('t', x)",
])
def test_values_of_shared_subtables_are_refused(use: str) -> None:
    code = "local x = {} for i = 1, 30 do x = {x, x} end " + use
    outcome, = child(code, timeout=30)
    assert "value too large" in json.dumps(outcome)


def test_a_reloaded_top_level_that_loops_keeps_the_old_code(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "function on_message(msg) return 'v1' end\n", max_instructions=100_000)
    reloader = HotReloader(engine.script, engine.clock, 1)
    entry = Path(engine.script.entry)
    entry.write_text("while true do end\nfunction on_message(msg) return 'v2' end\n" + STUBS)
    assert reloader.check() is False
    assert engine.message(None, "x").values == (b"v1",)
    entry.write_text("local t = {} while true do t[#t + 1] = {} end\n" + STUBS)
    assert reloader.check() is False
    assert engine.message(None, "x").values == (b"v1",)


def test_a_framing_callback_with_a_looping_error_object_fails_cleanly(tmp_path: Path) -> None:
    source = """
        function on_connect() end
        function protocol_input(buf)
          error(setmetatable({}, {__tostring = function() while true do end end}))
        end
        function protocol_decode(p) return p end
        function protocol_encode(d) return d end
        function on_message() end
        function on_close() end
    """
    engine = make_engine(tmp_path, source, kind="socket", stubs=False, max_instructions=100_000)
    conn, _ = engine.connect()
    with pytest.raises(Exception, match=r"error object is a table value"):
        engine.script.call_protocol("protocol_input", conn.cid, engine.script.new_buffer(engine.script.table([b"x"])))


# --- 3. bookkeeping -----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.finished = 0
        self.errors: list[tuple[str, str]] = []

    def overflow(self) -> None:
        pass

    def finish(self) -> None:
        self.finished += 1

    def error(self, callback: str, message: str) -> None:
        self.errors.append((callback, message))


@pytest.mark.parametrize("tostring_body", ["error('again')", "error(setmetatable({}, getmetatable(e)))", "return nil"])
def test_on_close_runs_whatever_the_error_object(tmp_path: Path, tostring_body: str) -> None:
    engine = make_engine(tmp_path, f"""
        closed = 0
        function on_message(msg)
          local mt = {{}}
          mt.__tostring = function(e) {tostring_body} end
          error(setmetatable({{}}, mt))
        end
        function on_close() closed = closed + 1 end
    """, max_instructions=100_000)
    conn, _ = engine.connect()
    calls = Recorder()
    session = CallbackSession(engine.script, conn, calls.overflow, calls.finish, calls.error)
    session.message(b"text", b"boom")
    session.close("gone")
    engine.clock.advance(0)
    assert calls.errors and calls.errors[0][0] == "on_message"
    assert calls.finished == 1  # on_close ran and the connection was let go


def test_waits_from_a_coroutine_the_engine_does_not_own_leave_no_waiter(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    conn, _ = engine.connect()
    code = "return pcall(coroutine.wrap(function() return mix.websocket():wait_context_value('k', 5) end))"
    for _ in range(3):
        ok, err = engine.message(conn, code).values
        assert ok is False and err.endswith(b"cannot wait here")
    assert conn._waiters == {} and engine.script.waiting == 0


@pytest.mark.parametrize("timeout", ["0/0", "-1", "1/0", "'soon'"])
def test_bad_wait_timeouts_are_clear_errors(tmp_path: Path, timeout: str) -> None:
    engine = make_engine(tmp_path)
    conn, _ = engine.connect()
    error = engine.message(conn, f"return mix.websocket():wait_context_value('k', {timeout})").error
    assert "bad argument #2 to 'wait_context_value' (non-negative finite number expected)" in error


def test_scripts_cannot_resume_another_connections_callback(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    a, _ = engine.connect()
    b, _ = engine.connect()
    suspended = engine.message(a, "H = coroutine.running() return mix.websocket():wait_context_value('k')")
    assert not suspended.finished
    ok, err = engine.message(b, "return coroutine.resume(H, 'forged')").values
    assert ok is False and err == b"cannot resume a coroutine of the engine"
    a.set_context_value("k", "real")
    assert suspended.values == (b"real",)


def test_bare_yields_resume_on_the_next_turn_as_often_as_they_come(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    outcome = engine.message(None, "coroutine.yield() coroutine.yield() coroutine.yield() return 'end'")
    for _ in range(3):
        engine.clock.advance(0)
    assert outcome.values == (b"end",)


def test_a_reload_starts_from_fresh_library_tables(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    conn, _ = engine.connect()
    engine.message(conn, "string.upper = function() return 'hacked' end "
                         "getmetatable('').__index = {upper = function() return 'meta' end} "
                         "table.concat = nil")
    assert engine.message(conn, "return getmetatable(mix.websocket())").values == (False,)
    engine.script.use(engine.script.compile())
    assert engine.message(conn, "return ('a'):upper(), string.upper('b'), table.concat({'c'})").values == (
        b"A", b"B", b"c")


def test_a_suspended_callback_finishes_after_the_runtime_ran_out_of_memory(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_memory_mib=16)
    a, _ = engine.connect()
    waiting = engine.message(a, "local v = mix.websocket():wait_context_value('k') return v")
    assert engine.message(None, "local t = {} while true do t[#t + 1] = {} end").error == "not enough memory"
    a.set_context_value("k", "after")
    assert waiting.values == (b"after",)
