"""The instruction limit holds for all user code while the engine's own Lua stays compiled.

User chunks (entry, modules, load/loadstring) run in the interpreter while a limit is set, so
the count hook fires in them; the limit is hot (SIGHUP): setting it later covers code loaded
before, and lifting it lets user code be compiled again.
"""

from __future__ import annotations

from pathlib import Path

from luahelpers import make_engine

LOOP = b"while true do end"


def test_limit_set_after_loading_stops_code_loaded_before(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, "function on_message(msg) if msg.data == 'loop' then while true do end end end\n")
    engine.script.set_instruction_limit(100_000)
    assert "instruction limit exceeded" in engine.message(None, b"loop").error


def test_limit_covers_code_from_loadstring_and_require(tmp_path: Path) -> None:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "spin.lua").write_text("return function() while true do end end\n")
    engine = make_engine(tmp_path, max_instructions=100_000, source=(
        "function on_message(msg)\n"
        "  if msg.data == 'module' then require('spin')() end\n"
        "  return assert(loadstring(msg.data))()\n"
        "end\n"))
    for code in (b"module", LOOP):
        assert "instruction limit exceeded" in engine.message(None, code).error
    assert engine.message(None, b"return 1").values == (1,)  # the runtime is still usable


def test_lifting_the_limit_lets_long_loops_finish(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_instructions=1000)
    assert "instruction limit exceeded" in engine.message(None, b"for i = 1, 100000 do end").error
    engine.script.set_instruction_limit(0)
    assert engine.message(None, b"local n = 0 for i = 1, 100000 do n = n + i end return n").values == (5000050000,)
