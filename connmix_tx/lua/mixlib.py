"""The Python half of the ``mix`` library: the host functions ``bootstrap.lua`` calls.

``MixLibrary`` binds one server's script to the engine: connections (context, subscriptions,
sending), the queues, the router (mesh send / publish) and logging.  Arguments arrive as Lua values
(bytes for strings, ``_LuaTable`` for tables) and results go back as Lua values.  Waiting functions
return ``(1, token)`` from ``Script.wait``; the others ``(0, results...)``.
"""

from __future__ import annotations

from typing import Any, Callable

from lupa import luajit21 as lupa
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from connmix_tx.engine.connections import CLOSED, ClientConnection, ConnectionRegistry
from connmix_tx.engine.queue import QueueError, QueueManager
from connmix_tx.engine.router import Router
from connmix_tx.ids import InvalidClientId, parse_client_id
from connmix_tx.later import now_or_later
from connmix_tx.lua import stdlib
from connmix_tx.lua.convert import ConvertError, json_to_lua, lua_to_py, py_to_lua, text_of
from connmix_tx.lua.http import HttpClient, HttpError
from connmix_tx.lua.redis import RedisError, RedisPools, ReplyError
from connmix_tx.lua.runtime import Script
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.lua")

INVALID_TYPE = "invalid type"
_LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}


def _text(value: object) -> str:
    """A Lua string or number as Python text (Lua coerces numbers to strings too)."""
    if isinstance(value, bytes):
        return text_of(value)
    if isinstance(value, bool) or value is None:
        raise TypeError("string expected")
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(value)
    raise TypeError("string expected")


def _data(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return _text(value).encode()


def _binary(kind: object) -> bool | None:
    """``"text"`` / nil -> False, ``"binary"`` -> True, anything else -> None (invalid)."""
    if kind is None or kind == b"text":
        return False
    if kind == b"binary":
        return True
    return None


def _err(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


class MixLibrary:
    """Host functions for one server's script."""

    def __init__(
        self,
        connections: ConnectionRegistry,
        router: Router,
        queues: QueueManager,
        clock: IReactor,
        options: dict[str, str],
        http: HttpClient | None = None,
        redis: RedisPools | None = None,
    ) -> None:
        self.connections = connections
        self.router = router
        self.queues = queues
        self.clock = clock
        self.options = options
        #: The engine's HTTP client and Redis pools (shared by its servers); replaceable in tests.
        self.http = http if http is not None else HttpClient(clock)
        self.redis = redis if redis is not None else RedisPools((), clock)
        self.script: Script | None = None  # set by bind()
        self.entry = ""

    def bind(self, script: Script) -> None:
        """Attach the script whose runtime converts values and suspends coroutines."""
        self.script = script
        self.entry = script.chunk_name(script.entry)

    def extensions(self) -> dict[str, Callable[..., Any]]:
        """``mix`` members implemented wholly in Python (name or ``"ns.name"``): ``stdlib``."""

        def runtime() -> Any:
            assert self.script is not None, "bind() the script before calling mix functions"
            return self.script.runtime

        return stdlib.extensions(runtime)

    def functions(self) -> dict[str, Callable[..., Any]]:
        """The host table for ``bootstrap.lua``."""
        names = [n for n in dir(self) if n.startswith(("conn_", "mesh_", "queue_", "json_", "http_", "redis_"))]
        table = {name: getattr(self, name) for name in names}
        table.update(log=self.lua_log, server_option=self.server_option, valid_utf8=self.valid_utf8)
        return table

    # helpers ---------------------------------------------------------------------------------

    def _conn(self, cid: bytes) -> ClientConnection | None:
        """The connection (also while its on_close runs), or None."""
        return self.connections.by_id.get(int(cid)) if cid else None

    def _to_lua(self, value: Any) -> Any:
        assert self.script is not None
        return py_to_lua(self.script.runtime, value)

    # connection ------------------------------------------------------------------------------

    def conn_remote_addr(self, cid: bytes) -> bytes | None:
        conn = self._conn(cid)
        return conn.remote_addr.encode() if conn else None

    def conn_context(self, cid: bytes) -> Any:
        conn = self._conn(cid)
        return self._to_lua(conn.context if conn else {})

    def conn_context_version(self, cid: bytes) -> int | None:
        """Changes whenever the context changes (None: no such connection, nothing to cache)."""
        conn = self._conn(cid)
        return conn.context_version if conn else None

    def conn_context_value(self, cid: bytes, key: object) -> Any:
        conn = self._conn(cid)
        if conn is None:
            return None
        return self._to_lua(conn.context.get(_text(key)))

    def conn_set_context(self, cid: bytes, values: Any) -> None:
        conn = self._conn(cid)
        converted = lua_to_py(values)
        if isinstance(converted, list):  # {} (or an array) has no keys to merge
            converted = {str(i + 1): v for i, v in enumerate(converted)}
        if conn is not None and not conn.closed:
            conn.set_context(converted)

    def conn_set_context_value(self, cid: bytes, key: object, value: Any) -> None:
        conn = self._conn(cid)
        converted = lua_to_py(value)
        if conn is not None and not conn.closed:
            conn.set_context_value(_text(key), converted)

    def conn_wait_context_value(self, cid: bytes, key: object, timeout: object = None) -> tuple:
        conn = self._conn(cid)
        name = _text(key)
        if conn is None or conn.closed:
            return 0, None, CLOSED.encode()
        if name in conn.context:
            return 0, self._to_lua(conn.context[name])
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise TypeError("bad argument #2 to 'wait_context_value' (number expected)")
        waiter = conn.wait_context_value(name)
        if timeout is not None:
            timer = self.clock.callLater(float(timeout), waiter.cancel)
            waiter.addBoth(_stop_timer, timer)

        def failed(failure: Failure) -> tuple:
            return None, (b"timeout" if failure.check(CancelledError) else CLOSED.encode())

        waiter.addCallbacks(lambda value: (self._to_lua(value),), failed)
        assert self.script is not None
        return self.script.wait(waiter)

    def conn_subscribe(self, cid: bytes, *channels: object) -> bytes | None:
        conn = self._conn(cid)
        if conn is None or conn.closed:
            return CLOSED.encode()
        return _err(self.connections.subscribe(conn, [_text(c) for c in channels]))

    def conn_unsubscribe(self, cid: bytes, *channels: object) -> None:
        conn = self._conn(cid)
        if conn is not None:
            self.connections.unsubscribe(conn, [_text(c) for c in channels])

    def conn_send(self, cid: bytes, data: object, kind: object = None) -> bytes | None:
        binary = _binary(kind)
        if binary is None:
            return INVALID_TYPE.encode()
        conn = self._conn(cid)
        if conn is None or conn.closed:
            return CLOSED.encode()
        return _err(conn.transport.send_message(_data(data), binary))

    def conn_close(self, cid: bytes) -> None:
        conn = self._conn(cid)
        if conn is not None and not conn.closed:
            conn.transport.close_connection()

    def conn_clear_buffer(self, cid: bytes) -> None:
        conn = self._conn(cid)
        if conn is not None:
            error = conn.transport.clear_buffer()
            if error:
                raise RuntimeError(error)

    # json, log, options ----------------------------------------------------------------------

    def valid_utf8(self, text: bytes) -> bytes:
        """``text`` with invalid UTF-8 replaced byte by byte by U+FFFD (as Go does)."""
        return text_of(text).encode()

    def json_decode(self, text: bytes) -> tuple[Any, bytes | None]:
        assert self.script is not None
        try:
            return json_to_lua(self.script.runtime, text), None
        except ConvertError as e:
            return None, str(e).encode()

    def lua_log(self, level: bytes, message: bytes, cid: bytes | None) -> None:
        fields: dict[str, Any] = {"entry": self.entry}
        if cid:
            fields["client_id"] = cid.decode()
        log.emit(_LEVELS[level.decode()], "{msg}", msg=message.decode("utf-8", "replace"), **fields)

    def server_option(self, name: object) -> bytes | None:
        value = self.options.get(_text(name))
        return None if value is None else value.encode()

    # queue and mesh --------------------------------------------------------------------------

    def _wait(self, result: Deferred) -> tuple:
        """Suspend the calling coroutine until ``result`` fires (a waiting function)."""
        assert self.script is not None
        return self.script.wait(result)

    def queue_push(self, cid: bytes | None, topic: object, payload: bytes) -> tuple:
        """Store JSON text already encoded by the Lua side (``mix.queue.push``)."""
        try:
            name = _text(topic)
        except TypeError:
            return 0, None, b"invalid topic"
        try:
            result = self.queues.push(name, cid.decode() if cid else "", payload)
        except QueueError as e:
            return 0, None, str(e).encode()
        # The redis backend answers later: the coroutine waits until Redis stored it.
        return now_or_later(result, lambda waiting: (0, waiting, None), lambda stored: self._wait(
            stored.addCallbacks(lambda ok: (True, None), _error_result, errbackArgs=(QueueError,))))

    def queue_waits(self) -> bool:
        """True when ``mix.queue.push`` waits for its backend (redis): it needs a coroutine."""
        return self.queues.waits

    def mesh_send(self, cid: bytes | None, client_id: object, data: object, kind: object = None) -> tuple:
        binary = _binary(kind)
        if binary is None:
            return 0, INVALID_TYPE.encode()
        try:
            target = parse_client_id(client_id)
        except InvalidClientId:
            return 0, b"invalid client id"
        payload = _data(data)
        link = self.router.route(target)
        if link is None:  # a client of this engine
            return 0, _err(self.router.local.send(target, payload, binary))
        if isinstance(link, str):  # no live engine with that number
            return 0, _err(link)
        # Another engine: the coroutine waits for the mesh reply, without a Deferred per message
        # (the mesh fast path, docs/performance.md).
        assert self.script is not None
        token, settle = self.script.error_waiter()
        link.submit_one(("send", target, payload, binary), settle)
        return 1, token

    def mesh_publish(self, cid: bytes | None, channel: object, data: object, kind: object = None) -> tuple:
        binary = _binary(kind)
        if binary is None:
            raise TypeError("bad argument #3 to 'publish' (\"text\" or \"binary\" expected)")
        return now_or_later(self.router.publish(_text(channel), _data(data), binary),
                            lambda counts: (0, counts[0], counts[1]),
                            lambda later: self._wait(later.addCallback(tuple)))

    # http and redis (waiting) ---------------------------------------------------------------

    def http_request(self, method: object, url: object, options: object = None) -> tuple:
        """``resp, err = mix.http.request(method, url[, options])``; bad arguments raise."""
        assert self.script is not None
        sending = self.http.request(method, url, options)
        sending.addCallbacks(lambda response: (self._to_lua(response),), _error_result, errbackArgs=(HttpError,))
        return self.script.wait(sending)

    def redis_connection(self, name: object) -> tuple[bytes | None, bytes | None]:
        """The canonical name for ``mix.redis.connection(name)``, or ``nil, err``."""
        if not isinstance(name, (bytes, int, float)) or isinstance(name, bool):
            kind = "nil" if name is None else "boolean" if isinstance(name, bool) else lupa.lua_type(name)
            raise TypeError(f"bad argument #1 to 'connection' (string expected, got {kind})")
        text = _text(name)
        if text not in self.redis:
            return None, f"unknown redis connection: {text}".encode()
        return text.encode(), None

    def redis_command(self, name: bytes, *args: object) -> tuple:
        """``v, err = r:command(cmd, ...)`` on the pool ``name``; bad arguments raise."""
        assert self.script is not None
        if not args:
            raise TypeError("bad argument #1 to 'command' (string expected, got no value)")
        command = [_redis_argument(value, index) for index, value in enumerate(args, 1)]
        running = self.redis.command(name.decode("utf-8", "replace"), command)
        running.addCallbacks(
            lambda reply: (self._to_lua(_redis_value(reply)), None),
            _error_result, errbackArgs=((RedisError, ReplyError),),
        )
        return self.script.wait(running)


def _error_result(failure: Failure, kinds: Any) -> tuple:
    """An expected failure as Lua's ``nil, err``; anything else stays a failure."""
    failure.trap(kinds)
    return None, str(failure.value).encode()


def _redis_argument(value: object, index: int) -> bytes:
    """A command argument: strings as they are, numbers in their shortest exact form."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value).is_integer() and abs(value) < 2**63:
            return b"%d" % int(value)
        return repr(float(value)).encode()
    kind = "nil" if value is None else "boolean" if isinstance(value, bool) else lupa.lua_type(value) or "userdata"
    raise TypeError(f"bad argument #{index} to 'command' (string or number expected, got {kind})")


def _redis_value(reply: Any) -> Any:
    """A reply as plain Python for ``py_to_lua``; an error inside an array becomes its text."""
    if isinstance(reply, list):
        return [_redis_value(item) for item in reply]
    if isinstance(reply, ReplyError):
        return str(reply).encode()
    return reply


def _stop_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result
