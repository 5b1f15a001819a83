"""Shared helpers for the Lua tests: entry scripts written on disk and wired up.

``make_engine`` writes the test's source and builds a ``connmix_tx.testing.ScriptEngine`` on it
(a real ``MixLibrary``, ``ConnectionRegistry``, ``QueueManager`` and ``Router`` on one ``Clock``:
no reactor, no sockets).  Entry scripts are written to ``<tmp>/lua/entry.lua`` so errors read
``lua/entry.lua:<line>: ...``; stubs for missing websocket callbacks are appended *after* the
test's source, so its line numbers are the ones the test wrote.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from connmix_tx.testing import ScriptEngine, script_engine

#: The engine of a Lua test (the name the tests use).
Engine = ScriptEngine

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


def make_engine(
    tmp_path: Path,
    source: str = EXEC_ENTRY,
    *,
    stubs: bool = True,
    **wiring: Any,
) -> Engine:
    """Write ``source`` as ``<tmp>/lua/entry.lua`` and wire it to real engine objects
    (``wiring`` are the keyword arguments of ``connmix_tx.testing.script_engine``)."""
    return script_engine(write_entry(tmp_path, source, stubs=stubs), **wiring)
