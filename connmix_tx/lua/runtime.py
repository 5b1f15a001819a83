"""One sandboxed LuaJIT runtime per protocol server, and the coroutine <-> Deferred bridge.

``Script`` owns a ``lupa.luajit21.LuaRuntime`` built as docs/lua-api.md, "The runtime" describes (no
eval, no builtins, bytes strings, a memory cap, an attribute handler that refuses every Python
attribute), runs ``bootstrap.lua`` in it and compiles the entry file into a sandbox environment.

Each callback runs in a new Lua coroutine (docs/lua-api.md, "Coroutines and waiting").  When Lua
calls a waiting function, the Python side hands back a *token* for a Deferred and the coroutine
yields it; when the Deferred fires, the coroutine is resumed with the Deferred's result (a tuple of
Lua values).  The caller of ``run`` learns the outcome through its ``done`` callback, so a callback
that never waits costs no Deferred at all.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import weakref
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable

from lupa import luajit21 as lupa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="connmix.lua")

#: Memory kept above the script's budget for the engine's own unprotected Lua API calls
#: (pushing arguments and results, building tables for host functions); docs/robustness.md.
HEADROOM = 16 * 1024 * 1024
NOT_ENOUGH_MEMORY = "not enough memory"

WEBSOCKET_CALLBACKS = ("on_handshake", "on_message", "on_close")
SOCKET_CALLBACKS = (
    "on_connect",
    "on_close",
    "protocol_input",
    "protocol_decode",
    "protocol_encode",
    "on_message",
)
REQUIRED_CALLBACKS = {"websocket": WEBSOCKET_CALLBACKS, "socket": SOCKET_CALLBACKS}

#: ``done(ok, value)``: ``ok`` True -> ``value`` is the tuple the callback returned;
#: ``ok`` False -> ``value`` is the error message (with file:line).
Done = Callable[[bool, Any], None]


@functools.cache
def lua_version() -> str:
    """``jit.version`` read from a fresh LuaJIT runtime, e.g. ``LuaJIT 2.1.1774896198``."""
    runtime = lupa.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    return str(runtime.eval("jit.version").decode())


class ScriptError(Exception):
    """The entry script cannot be loaded, or a framing callback failed."""


def _deny_attribute(obj: object, name: object, *value: object) -> object:
    raise AttributeError("Python attributes are not accessible from Lua")


@dataclass
class _Wait:
    """A coroutine suspended on a Deferred, or a Deferred that fired before the yield."""

    co: Any = None
    done: Done | None = None
    cid: bytes | None = None
    result: tuple | None = None
    settled: bool = False


@dataclass
class _Generation:
    """One compiled version of the entry (a hot reload makes a new one)."""

    env: Any
    files: dict[str, tuple[float, int]] = field(default_factory=dict)


class Script:
    """The Lua runtime of one protocol server.

    ``functions`` are the host functions the Lua side of ``mix`` calls (see ``bootstrap.lua``);
    ``extensions`` are extra ``mix`` members (name or ``"ns.name"`` -> Python callable).
    """

    def __init__(
        self,
        entry: str,
        kind: str,
        functions: dict[str, Callable[..., Any]],
        clock: IReactorTime,
        max_memory_mib: int = 256,
        max_instructions: int = 0,
        extensions: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.entry = os.path.abspath(entry)
        self.kind = kind
        self.entry_dir = os.path.dirname(self.entry)
        # Chunk names are relative to the parent of the entry folder: "lua/entry.websocket.lua".
        self._name_base = os.path.dirname(self.entry_dir)
        self._clock = clock
        self._tokens = itertools.count(1)
        self._waits: dict[int, _Wait] = {}
        self._depth = 0
        # Set when a callback ran out of memory: its dead coroutine held the memory until the
        # Python side let go of it, so the next callback collects first.
        self._collect = False
        # Set when a host function raised during a slice (see bootstrap.lua, python_raised).
        self._drop_exception = False
        self.budget = max_memory_mib * 1024 * 1024
        self.runtime = lupa.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            encoding=None,
            max_memory=self.budget + HEADROOM,
            attribute_handlers=(_deny_attribute, _deny_attribute),
        )
        limit_address = _limit_address(self.runtime, self.budget + HEADROOM)
        #: False when lupa's allocator limit was not found: scripts may then use the headroom.
        self.memory_split = limit_address is not None
        if limit_address is None:
            log.warn("lua memory limit cannot be split; the script may use the headroom too")

        host: dict[str, Any] = dict(functions)  # and server_kind, a byte string
        if "valid_utf8" in host:
            host["valid_utf8"] = self._sized(host["valid_utf8"])
        host.update(
            server_kind=kind.encode(),
            read_module=self._read_module,
            forget=self._forget,
            raised=self._raised,
            fail=_fail,
            extensions=self.runtime.table_from(
                {name.encode(): self._sized(fn) for name, fn in (extensions or {}).items()}
            ),
        )
        self._loading: dict[str, tuple[float, int]] | None = None
        source = resources.files("connmix_tx.lua").joinpath("bootstrap.lua").read_bytes()
        self._engine = self.runtime.execute(source, self.runtime.table_from(
            {k.encode(): v for k, v in host.items()}
        ), limit_address)
        base = self.runtime.get_memory_used(total=True) - self.runtime.get_memory_used()
        self._engine.set_memory_limits(base + self.budget, base + self.budget + HEADROOM)
        key = id(self.runtime)

        def gone(_: object) -> None:
            _SCRIPTS.pop(key, None)

        _SCRIPTS[key] = weakref.ref(self, gone)
        self._resume = self._engine.resume
        self._start = self._engine.start
        self._start_message = self._engine.start_message
        self._call_protocol = self._engine.call_protocol
        # Looked up once: lupa reads a table field through the main Lua stack, which gives
        # garbage while a coroutine runs (a host function asking for room, a connection
        # forgotten from inside a callback).
        self._collect_garbage = self._engine.collect
        self._forget_connection = self._engine.forget_connection
        self._new_buffer = self._engine.new_buffer
        self._rethrow = self._engine.rethrow
        self.set_instruction_limit(max_instructions)
        self._generation: _Generation | None = None

    # Loading -------------------------------------------------------------------------------

    def chunk_name(self, path: str) -> str:
        """The name errors show for ``path``: relative to the folder above the entry folder."""
        return os.path.relpath(path, self._name_base)

    def compile(self) -> _Generation:
        """Compile the entry (and the modules it requires at load time) into a new environment.

        Raises ScriptError with the Lua message (file:line) on a syntax error, an error raised
        by the chunk, or a missing or non-function required callback.
        """
        try:
            with open(self.entry, "rb") as f:
                source = f.read()
        except OSError as e:
            raise ScriptError(f"cannot read {self.entry}: {e.strerror}") from None
        files = {self.entry: _stat(self.entry)}
        self._loading = files
        if not self.room(len(source)):
            raise ScriptError(f"{self.chunk_name(self.entry)}: {NOT_ENOUGH_MEMORY}")
        try:
            env, err = self._engine.compile(source, self.chunk_name(self.entry).encode())
        except lupa.LuaError as e:
            self._collect = True
            raise ScriptError(_text(e)) from None
        finally:
            self._loading = None
        if env is None:
            raise ScriptError(_text(err))
        for name in REQUIRED_CALLBACKS[self.kind]:
            kind = self._engine.type_of(env, name.encode())
            if kind != b"function":
                what = "missing" if kind == b"nil" else f"not a function ({kind.decode()})"
                raise ScriptError(f"{self.chunk_name(self.entry)}: callback {name} is {what}")
        return _Generation(env, files)

    def load(self) -> None:
        """Compile the entry and use it from now on (start-up)."""
        self.use(self.compile())

    def use(self, generation: _Generation) -> None:
        """Use an already compiled generation for callbacks started from now on (hot reload)."""
        self._engine.use(generation.env)
        self._generation = generation

    @property
    def files(self) -> dict[str, tuple[float, int]]:
        """The files of the current generation with their (mtime, size) at load time."""
        return dict(self._generation.files) if self._generation else {}

    def _read_module(self, name: bytes) -> tuple[bytes | None, bytes]:
        text = name.decode("utf-8", "replace")
        if not text or text.startswith(("/", "\\")) or ".." in text.replace("\\", "/").split("/") \
                or ".." in text.split("."):
            return None, f"module '{text}' is outside the lua folder".encode()
        relative = text.replace(".", "/") if "/" not in text else text
        for candidate in (relative + ".lua", relative + "/init.lua"):
            path = os.path.normpath(os.path.join(self.entry_dir, candidate))
            if not path.startswith(self.entry_dir + os.sep):
                return None, f"module '{text}' is outside the lua folder".encode()
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    source = f.read()
                if self._loading is not None:
                    self._loading[path] = _stat(path)
                elif self._generation is not None:
                    self._generation.files[path] = _stat(path)
                return source, self.chunk_name(path).encode()
        return None, f"module '{text}' not found in {self.chunk_name(self.entry_dir)}".encode()

    def forget_connection(self, cid: bytes) -> None:
        """Drop what the Lua side caches for a connection that has ended."""
        self._forget_connection(cid)

    def new_buffer(self, source: bytes, offset: int = 0) -> Any:
        """A buffer object (docs/lua-api.md) over ``source[offset:]`` for ``protocol_input``."""
        return self._new_buffer(source, offset)

    # Limits --------------------------------------------------------------------------------

    def room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the script's budget (collecting garbage first if
        they do not); host functions ask before building a large result."""
        if self.runtime.get_memory_used() + size <= self.budget:
            return True
        self._collect_garbage()
        return self.runtime.get_memory_used() + size <= self.budget

    def set_instruction_limit(self, limit: int) -> None:
        """Apply ``engine.luavm.maxInstructions`` (hot): user code runs uncompiled while a limit is
        set, because count hooks do not fire in compiled traces (docs/robustness.md)."""
        self._engine.set_instruction_limit(limit)

    def _sized(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` refusing a large string result that would not fit in the budget."""

        def sized(*args: Any) -> Any:
            result = function(*args)
            for value in result if isinstance(result, tuple) else (result,):
                if isinstance(value, bytes) and len(value) > 65536 and not self.room(len(value) + 64):
                    raise MemoryError(NOT_ENOUGH_MEMORY)
            return result

        return sized

    # Callbacks -----------------------------------------------------------------------------

    def run(self, callback: str, cid: bytes, args: Iterable[Any], done: Done) -> None:
        """Run ``callback(*args)`` for client ``cid`` in a new coroutine; report through ``done``."""
        assert self._generation is not None, "load() first"
        if self._collect:
            self._collect = False
            self._collect_garbage()
        self._depth += 1
        try:
            co, *outcome = self._start(self._generation.env, callback.encode(), cid, *args)
        except lupa.LuaError as e:
            self._collect = True
            done(False, _text(e))
            return
        finally:
            self._depth -= 1
        self._outcome(co, cid, outcome, done)

    def run_message(self, cid: bytes, kind: bytes, data: bytes, done: Done) -> None:
        """Run ``on_message({type=kind, data=data, finish=true})`` for client ``cid``."""
        assert self._generation is not None, "load() first"
        if len(data) > HEADROOM // 4 and not self.room(len(data)):
            done(False, NOT_ENOUGH_MEMORY)
            return
        if self._collect:
            self._collect = False
            self._collect_garbage()
        self._depth += 1
        try:
            co, *outcome = self._start_message(self._generation.env, cid, kind, data)
        except lupa.LuaError as e:
            self._collect = True
            done(False, _text(e))
            return
        finally:
            self._depth -= 1
        self._outcome(co, cid, outcome, done)

    def call_protocol(self, name: str, cid: bytes, *args: Any) -> tuple:
        """Run a framing callback synchronously; raise ScriptError when it fails."""
        assert self._generation is not None, "load() first"
        if self._collect:
            self._collect = False
            self._collect_garbage()
        self._depth += 1
        try:
            ok, *values = self._call_protocol(self._generation.env, name.encode(), cid, *args)
        except lupa.LuaError as e:
            self._collect = True
            raise ScriptError(_text(e)) from None
        finally:
            self._depth -= 1
        if self._drop_exception:
            self._let_go()
        if not ok:
            message = _text(values[0])
            if NOT_ENOUGH_MEMORY in message:
                self._collect = True
            raise ScriptError(message)
        return tuple(values)

    def _raised(self) -> None:
        self._drop_exception = True

    def _let_go(self) -> None:
        """Make lupa drop the Python exception it kept (and the frames it holds)."""
        self._drop_exception = False
        try:
            self._rethrow()
        except _Dropped:
            pass

    def _outcome(self, co: Any, cid: bytes, outcome: list, done: Done) -> None:
        if self._drop_exception:
            self._let_go()
        while True:
            status = outcome[0]
            if status == b"done":
                done(True, tuple(outcome[1:]))
                return
            if status == b"error":
                log.debug("lua traceback: {traceback}", traceback=_text(outcome[2]))
                message = _text(outcome[1])
                if NOT_ENOUGH_MEMORY in message:
                    self._collect = True
                done(False, message)
                return
            if status == b"yield":
                self._clock.callLater(0, self._resume_with, co, cid, (), done)
                return
            wait = self._waits.get(outcome[1])
            if wait is None:
                done(False, "internal error: unknown wait token")
                return
            if not wait.settled:
                wait.co, wait.done, wait.cid = co, done, cid
                return
            del self._waits[outcome[1]]
            outcome = self._resume_now(co, wait.result or ())
            if self._drop_exception:
                self._let_go()

    def _resume_now(self, co: Any, values: tuple) -> list:
        self._depth += 1
        try:
            result = self._resume(co, *values)
        except lupa.LuaError as e:
            self._collect = True
            return [b"error", _text(e).encode(), b""]
        finally:
            self._depth -= 1
        # One result comes back bare, not as a tuple.
        return list(result) if isinstance(result, tuple) else [result]

    def _resume_with(self, co: Any, cid: bytes, values: tuple, done: Done) -> None:
        self._outcome(co, cid, self._resume_now(co, values), done)

    # Waiting -------------------------------------------------------------------------------

    def wait(self, deferred: Deferred) -> tuple[int, int]:
        """Suspend the running callback until ``deferred`` fires with a tuple of Lua values.

        Host functions return this value to Lua (``1, token``); an errback becomes
        ``nil, <message>``.
        """
        token = next(self._tokens)
        self._waits[token] = _Wait()
        deferred.addCallbacks(self._settled, self._failed, callbackArgs=(token,), errbackArgs=(token,))
        return 1, token

    def error_waiter(self) -> tuple[int, Callable[[str | None], None]]:
        """A wait without a Deferred, for a host function whose one result is an error text or
        None (``mix.mesh.send``): ``(token, settle)``.  The host function returns ``1, token`` to
        Lua; ``settle(error)`` later resumes the coroutine with nil or the text."""
        token = next(self._tokens)
        self._waits[token] = _Wait()
        settled = self._settled
        return token, lambda error: settled((None,) if error is None else (error.encode(),), token)

    def _failed(self, failure: Any, token: int) -> None:
        self._settled((None, str(failure.getErrorMessage()).encode()), token)

    def _settled(self, result: tuple, token: int) -> None:
        wait = self._waits.get(token)
        if wait is None:
            return  # forgotten: the callback could not wait after all
        wait.result, wait.settled = tuple(result), True
        if wait.co is None:
            return  # fired before the coroutine yielded; _outcome picks it up
        del self._waits[token]
        assert wait.cid is not None and wait.done is not None  # set with co when it yielded
        if self._depth:
            # Never resume one coroutine from inside another's run-slice.
            self._clock.callLater(0, self._resume_with, wait.co, wait.cid, wait.result, wait.done)
        else:
            self._outcome(wait.co, wait.cid, self._resume_now(wait.co, wait.result), wait.done)

    def _forget(self, token: int) -> None:
        self._waits.pop(token, None)

    @property
    def waiting(self) -> int:
        """How many coroutines are suspended right now (for tests and churn checks)."""
        return sum(1 for w in self._waits.values() if w.co is not None)

    # Values --------------------------------------------------------------------------------

    def table(self, mapping: dict | list) -> Any:
        """A Lua table from a Python dict or list (keys and values already Lua-ready)."""
        return self.runtime.table_from(mapping)


#: id(runtime) -> the Script that owns it (LuaRuntime objects take no weak references).
_SCRIPTS: dict[int, "weakref.ref[Script]"] = {}


def has_room(runtime: Any, size: int) -> bool:
    """Whether ``size`` more bytes fit in the script budget of ``runtime`` (always true for a
    runtime no Script owns); collects garbage once before saying no."""
    ref = _SCRIPTS.get(id(runtime))
    script = ref() if ref is not None else None
    if script is None or script.runtime is not runtime:
        return True
    return script.room(size)


def _limit_address(runtime: Any, limit: int) -> int | None:
    """The address of lupa's allocation limit (``MemoryStatus.limit``) inside ``runtime``.

    lupa keeps it in the runtime object; it is found by its value and checked by changing it
    through ``set_max_memory``.  None when it cannot be found (another lupa layout).
    """
    size = type(runtime).__basicsize__
    words = (ctypes.c_size_t * (size // ctypes.sizeof(ctypes.c_size_t))).from_address(id(runtime))
    base = runtime.get_memory_used(total=True) - runtime.get_memory_used()
    candidates = [i for i, word in enumerate(words) if word == base + limit]
    runtime.set_max_memory(limit + 4096)
    found = [i for i in candidates if words[i] == base + limit + 4096]
    runtime.set_max_memory(limit)
    if len(found) != 1:
        return None
    return id(runtime) + found[0] * ctypes.sizeof(ctypes.c_size_t)


class _Dropped(Exception):
    """Raised through the runtime to replace the exception lupa keeps."""


def _fail() -> None:
    raise _Dropped()


def _stat(path: str) -> tuple[float, int]:
    st = os.stat(path)
    return st.st_mtime, st.st_size


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
