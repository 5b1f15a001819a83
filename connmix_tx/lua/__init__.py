"""The Python side of the Lua layer: runtime, sandbox, coroutine bridge and the ``mix`` library."""
