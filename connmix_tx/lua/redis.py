"""``mix.redis`` (docs/lua-api.md, "Redis"): named Redis connection pools for Lua scripts.

A small RESP2 client on Twisted rather than ``txredisapi``: that library connects every pool
slot as soon as the pool is made and keeps reconnecting in the background (we want lazy
connections, so that start-up needs no Redis), calls the global reactor (no injected
clock), has no idle timeout, and turns numeric bulk strings into numbers by default.  What we
need is small: one command at a time per connection, a pool per configured name, a deadline per
command.

* ``RespParser`` (hiredis underneath): bytes in, replies out (``bytes`` for status and bulk
  strings, ``int``, ``None`` for nil, ``list`` for arrays, ``ReplyError`` for error replies).
* ``RedisProtocol`` sends commands and matches replies in order.
* ``RedisPool`` opens connections on demand (at most ``poolSize``), authenticates and selects the
  database, hands each command an idle connection (or queues it until one is free), closes
  connections idle for ``idleTimeout`` seconds or older than ``maxConnAge``, and fails a command
  that got no reply within ``timeout`` seconds (the connection it used is dropped, since a late
  reply would otherwise answer the next command).  ``minIdleConns`` is accepted and ignored
  (docs/configuration.md says so): keeping idle connections open would defeat the lazy start.
* ``RedisPools`` maps the names of ``engine.luavm.redis`` to pools.

Failures are ``RedisError`` whose text is the ``err`` the script sees: the server's error text for
an error reply, ``"redis: <reason>"`` for everything else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.config import RedisConfig
from connmix_tx.lua.http import network_error
from connmix_tx.reactors import IReactor, IStreamTransport

log = Logger(namespace="connmix.redis")

#: Seconds a command may wait for its reply (docs/lua-api.md, "Redis").
COMMAND_TIMEOUT = 10.0
#: Commands that change the state of a connection; with pooled connections their effect would
#: leak into unrelated later commands (or, for SUBSCRIBE, take the connection over).
REFUSED = frozenset(
    b"SUBSCRIBE PSUBSCRIBE SSUBSCRIBE MONITOR MULTI EXEC DISCARD WATCH UNWATCH SELECT AUTH "
    b"HELLO QUIT RESET".split()
)

Reply = Any  # bytes | int | None | list | ReplyError


class ReplyError(Exception):
    """An error reply from the server (``-ERR ...``); ``str()`` is its text."""


class RedisError(Exception):
    """A failed command; ``str()`` is the ``err`` string returned to Lua."""


class ProtocolError(Exception):
    """The server sent something that is not RESP."""


class RespParser:
    """Incremental RESP2 reply parser: a thin wrapper over ``hiredis.Reader`` (a maintained C
    parser that keeps its own buffer, so a large reply arriving in many chunks is parsed once)."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; return the replies they complete, in order.  Raise ProtocolError."""
        reader = self._reader
        reader.feed(data)
        replies: list[Reply] = []
        while True:
            reply = reader.gets()
            if reply is False:
                return replies
            replies.append(reply)


def encode_command(args: Sequence[bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RedisProtocol(Protocol):
    """One connection: commands go out, replies come back in the same order."""

    #: Set once the connection is made; a connected stream (write, abort, pause reading).
    transport: IStreamTransport

    def __init__(self) -> None:
        self.parser = RespParser()
        self.pending: deque[Deferred] = deque()
        self.connected_at = 0.0
        self.open = False
        self.lost: Failure | None = None
        self.on_lost: Callable[[RedisProtocol], None] | None = None

    def connectionMade(self) -> None:
        self.open = True

    def execute(self, args: Sequence[bytes]) -> Deferred:
        """Send one command; the Deferred fires with the reply (``ReplyError`` is a value)."""
        d: Deferred = Deferred(lambda _: self.abort())
        if not self.open:
            d.errback(RedisError("redis: connection lost"))
            return d
        self.pending.append(d)
        self.transport.write(encode_command(args))
        return d

    def pipeline(self, commands: Sequence[Sequence[bytes]]) -> list[Deferred]:
        """Send several commands in one write; one Deferred per command, as ``execute``."""
        if not self.open:
            return [_failed(RedisError("redis: connection lost")) for _ in commands]
        results: list[Deferred] = [Deferred() for _ in commands]
        self.pending.extend(results)
        self.transport.write(b"".join(encode_command(args) for args in commands))
        return results

    @property
    def idle(self) -> bool:
        return self.open and not self.pending

    def abort(self) -> None:
        if self.transport is not None and self.open:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ProtocolError as e:
            log.warn("redis protocol error from {peer}: {error}", peer=self.transport.getPeer(), error=e)
            self.abort()
            return
        for reply in replies:
            if not self.pending:
                log.warn("unexpected redis reply from {peer}", peer=self.transport.getPeer())
                self.abort()
                return
            d = self.pending.popleft()
            if not d.called:
                d.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        self.lost = reason
        pending, self.pending = self.pending, deque()
        for d in pending:
            if not d.called:
                d.errback(RedisError("redis: " + network_error(reason)))
        if self.on_lost is not None:
            self.on_lost(self)


@dataclass(eq=False)
class _Command:
    args: list[bytes]
    result: Deferred
    timer: IDelayedCall | None = None
    conn: RedisProtocol | None = None
    finished: bool = False


@dataclass(eq=False)
class _Idle:
    conn: RedisProtocol
    timer: IDelayedCall | None = field(default=None)


class RedisPool:
    """The pooled connections of one ``engine.luavm.redis[]`` entry."""

    def __init__(
        self,
        config: RedisConfig,
        reactor: IReactor,
        timeout: float = COMMAND_TIMEOUT,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.timeout = timeout
        self.endpoint = endpoint or HostnameEndpoint(
            reactor, config.addr.host, config.addr.port, timeout=timeout
        )
        self.idle: list[_Idle] = []
        self.busy: set[RedisProtocol] = set()
        self.opening = 0
        self.waiting: deque[_Command] = deque()
        self.closed = False

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return len(self.idle) + len(self.busy) + self.opening

    def command(self, args: Sequence[bytes]) -> Deferred:
        """Run one command; fires with the reply, fails with RedisError."""
        command = _Command(list(args), Deferred())
        if self.closed:
            command.result.errback(RedisError("redis: client closed"))
            return command.result
        command.timer = self.reactor.callLater(self.timeout, self._expire, command)
        self._dispatch(command)
        return command.result

    # dispatching ---------------------------------------------------------------------------

    def _dispatch(self, command: _Command) -> None:
        if self.idle:
            idle = self.idle.pop()
            if idle.timer is not None and idle.timer.active():
                idle.timer.cancel()
            self._run(command, idle.conn)
        elif self.size < self.config.pool_size:
            self._open(command)
        else:
            self.waiting.append(command)

    def _open(self, command: _Command) -> None:
        self.opening += 1
        # The endpoint fires with the protocol the factory built.
        connecting = cast("Deferred[RedisProtocol]", self.endpoint.connect(Factory.forProtocol(RedisProtocol)))
        connecting.addCallback(self._prepare)

        def opened(conn: RedisProtocol) -> None:
            self.opening -= 1
            conn.on_lost = self._lost
            conn.connected_at = self.reactor.seconds()
            if not conn.open or self.closed:
                conn.abort()
                reason = "client closed" if self.closed else "connection lost"
                self._finish(command, Failure(RedisError(f"redis: {reason}")))
                self._next()
                return
            self.busy.add(conn)
            self._run(command, conn)

        def failed(failure: Failure) -> None:
            self.opening -= 1
            error = failure.value if failure.check(RedisError) else RedisError("redis: " + network_error(failure))
            self._finish(command, Failure(error))
            # Commands queued behind this one would try the same server; fail them too rather
            # than let each wait for its own timeout.
            while self.waiting and self.size < self.config.pool_size:
                self._finish(self.waiting.popleft(), Failure(error))

        connecting.addCallbacks(opened, failed)
        connecting.addErrback(lambda failure: log.failure("redis pool error", failure))

    def _prepare(self, conn: RedisProtocol) -> Deferred:
        """AUTH and SELECT on a new connection; fires with the connection when it is usable."""
        steps: list[list[bytes]] = []
        if self.config.password:
            steps.append([b"AUTH", self.config.password.encode()])
        if self.config.db:
            steps.append([b"SELECT", b"%d" % self.config.db])
        d: Deferred = Deferred()
        d.callback(None)

        def run(_: object, step: list[bytes]) -> Deferred:
            return conn.execute(step)

        for step in steps:
            d.addCallback(run, step)
            d.addCallback(_raise_reply_error)
        timer = self.reactor.callLater(self.timeout, conn.abort)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                conn.abort()
                return result
            return conn

        return d.addBoth(done)

    def _run(self, command: _Command, conn: RedisProtocol) -> None:
        if command.finished:
            self._release(conn)
            return
        self.busy.add(conn)
        command.conn = conn
        conn.execute(command.args).addBoth(self._replied, command, conn)

    def _replied(self, reply: Any, command: _Command, conn: RedisProtocol) -> None:
        # Release first: finishing resumes the script, whose next command can then reuse conn.
        self._release(conn)
        self._finish(command, reply)

    def _release(self, conn: RedisProtocol) -> None:
        self.busy.discard(conn)
        if not conn.idle or self.closed:
            conn.abort()
            return
        age = self.config.max_conn_age
        if age and self.reactor.seconds() - conn.connected_at >= age:
            conn.transport.loseConnection()
            return
        if self.waiting:
            self._run(self.waiting.popleft(), conn)
            return
        idle = _Idle(conn)
        if self.config.idle_timeout:
            idle.timer = self.reactor.callLater(self.config.idle_timeout, self._idle_expired, idle)
        self.idle.append(idle)

    def _idle_expired(self, idle: _Idle) -> None:
        if idle in self.idle:
            self.idle.remove(idle)
            idle.conn.transport.loseConnection()

    def _lost(self, conn: RedisProtocol) -> None:
        self.busy.discard(conn)
        for idle in list(self.idle):
            if idle.conn is conn:
                self.idle.remove(idle)
                if idle.timer is not None and idle.timer.active():
                    idle.timer.cancel()
        self._next()

    def _next(self) -> None:
        """A connection went away: a queued command may open a new one."""
        if self.waiting and not self.closed and self.size < self.config.pool_size:
            self._dispatch(self.waiting.popleft())

    # finishing -----------------------------------------------------------------------------

    def _expire(self, command: _Command) -> None:
        if command in self.waiting:
            self.waiting.remove(command)
        self._finish(command, Failure(RedisError("redis: timeout")))
        if command.conn is not None:
            command.conn.abort()  # its late reply must not answer the next command

    def _finish(self, command: _Command, result: Any) -> None:
        if command.finished:
            return
        command.finished = True
        if command.timer is not None and command.timer.active():
            command.timer.cancel()
        if isinstance(result, (Failure, ReplyError)):
            command.result.errback(result)
        else:
            command.result.callback(result)

    def close(self) -> None:
        """Close every connection and fail queued commands (engine stop)."""
        self.closed = True
        while self.waiting:
            self._finish(self.waiting.popleft(), Failure(RedisError("redis: client closed")))
        for idle in list(self.idle):
            if idle.timer is not None and idle.timer.active():
                idle.timer.cancel()
            idle.conn.transport.loseConnection()
        for conn in list(self.busy):
            conn.abort()


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


def _raise_reply_error(reply: Reply) -> Reply:
    if isinstance(reply, ReplyError):
        raise RedisError(f"redis: {reply}")
    return reply


class RedisPools:
    """The pools of ``engine.luavm.redis``, by name; each opens its connections on first use."""

    def __init__(self, configs: Iterable[RedisConfig], reactor: IReactor, timeout: float = COMMAND_TIMEOUT) -> None:
        self.configs = {c.name: c for c in configs}
        self.reactor = reactor
        self.timeout = timeout
        self.pools: dict[str, RedisPool] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.configs

    def pool(self, name: str) -> RedisPool:
        """The pool for ``name`` (KeyError for an unknown name), made on first use."""
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = RedisPool(self.configs[name], self.reactor, self.timeout)
        return pool

    def command(self, name: str, args: Sequence[bytes]) -> Deferred:
        """Run a command on the pool ``name``; refuses connection-state commands."""
        verb = args[0].upper() if args else b""
        if verb in REFUSED:
            d: Deferred = Deferred()
            d.errback(RedisError(f"redis: {verb.decode('utf-8', 'replace').lower()} is not supported"))
            return d
        return self.pool(name).command(args)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
