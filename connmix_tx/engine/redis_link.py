"""One pipelined connection to the Redis of the ``redis`` queue backend (docs/queues.md).

``RedisLink`` keeps a single connection to the ``luavm.redis`` entry the queues use: commands
issued during one reactor turn go out in one write at the end of the turn (a pipeline), replies
come back in order.  Every command gets an answer within ``timeout`` seconds or the connection is
taken for dead.  While the connection is down, commands fail at once with ``RedisError`` and the
link reconnects with a back-off of 1 s doubling up to 30 s; each change of state is logged once
(``queue backend redis {addr} down: {reason}`` / ``... up``) and reported to ``on_up`` /
``on_down``.  On every (re)connection ``prepare`` commands (AUTH, SELECT, script loads) run before
the link counts as up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from connmix_tx.config import RedisConfig
from connmix_tx.lua.http import network_error
from connmix_tx.lua.redis import RedisError, RedisProtocol, ReplyError
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.queue")

#: Seconds a command may wait for its reply before the connection is taken for dead.
TIMEOUT = 2.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class RedisLink:
    """A reconnecting, pipelining connection (plain logic; reactor and endpoint injected)."""

    def __init__(
        self,
        config: RedisConfig,
        reactor: IReactor,
        prepare: Callable[[], list[list[bytes]]] = list,
        on_up: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
        endpoint: IStreamClientEndpoint | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.prepare = prepare
        self.on_up = on_up
        self.on_down = on_down
        self.timeout = timeout
        self.endpoint = endpoint  # made on the first connection when not given
        self.addr = str(config.addr)
        self.up = False
        self.conn: RedisProtocol | None = None
        self._state: str | None = None  # "up" / "down" as last logged
        self._delay = BACKOFF_FIRST
        self._reconnect: IDelayedCall | None = None
        self._flush_call: IDelayedCall | None = None
        self._outbox: list[tuple[Sequence[bytes], Deferred]] = []
        self._stopped = False
        self._connecting = False

    # life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> None:
        """Close the connection, fail what waits, stop reconnecting."""
        self._stopped = True
        for call in (self._reconnect, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._reconnect = self._flush_call = None
        self._fail_outbox(RedisError("redis: client closed"))
        if self.conn is not None:
            self.conn.on_lost = None
            self.conn.abort()
            self.conn = None
        self.up = False

    def _connect(self) -> None:
        self._reconnect = None
        if self._stopped or self._connecting:
            return
        self._connecting = True
        factory = Factory.forProtocol(RedisProtocol)
        factory.noisy = False
        if self.endpoint is None:
            self.endpoint = HostnameEndpoint(self.reactor, self.config.addr.host, self.config.addr.port,
                                             timeout=self.timeout)
        connecting = self.endpoint.connect(factory)
        connecting.addCallbacks(self._connected, self._failed_to_connect)

    def _connected(self, conn: RedisProtocol) -> None:
        self._connecting = False
        if self._stopped:
            conn.abort()
            return
        conn.on_lost = self._lost
        self.conn = conn
        steps = []
        if self.config.password:
            steps.append([b"AUTH", self.config.password.encode()])
        if self.config.db:
            steps.append([b"SELECT", b"%d" % self.config.db])
        steps.extend(self.prepare())
        if not steps:
            self._ready(conn)
            return
        replies = conn.pipeline(steps)
        timer = self.reactor.callLater(self.timeout, conn.abort)

        def done(results: list[tuple[bool, Any]]) -> None:
            if timer.active():
                timer.cancel()
            for ok, value in results:
                problem = value if ok and isinstance(value, ReplyError) else None if ok else value.value
                if problem is not None:
                    self._down(f"{problem}")
                    conn.abort()
                    return
            if conn.open:
                self._ready(conn)

        DeferredList(replies, consumeErrors=True).addCallback(done)

    def _ready(self, conn: RedisProtocol) -> None:
        self.up = True
        self._delay = BACKOFF_FIRST
        if self._state != "up":
            self._state = "up"
            log.info("queue backend redis {addr} up", addr=self.addr)
        self.on_up()
        if self._outbox:
            self._schedule_flush()

    def _failed_to_connect(self, failure: Failure) -> None:
        self._connecting = False
        if self._stopped:
            return
        self._down(network_error(failure))
        self._retry()

    def _lost(self, conn: RedisProtocol) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self._down(network_error(conn.lost) if conn.lost is not None else "connection lost")
        self._retry()

    def _down(self, reason: str) -> None:
        was_up = self.up
        self.up = False
        if self._state != "down":
            self._state = "down"
            log.warn("queue backend redis {addr} down: {reason}", addr=self.addr, reason=reason)
        self._fail_outbox(RedisError("redis: " + reason))
        if was_up:
            self.on_down()

    def _retry(self) -> None:
        if self._stopped or self._reconnect is not None:
            return
        self._reconnect = self.reactor.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    # commands ------------------------------------------------------------------------------

    def command(self, args: Sequence[bytes]) -> Deferred:
        """Queue one command for this turn's pipeline; fires with the reply (a ``ReplyError``
        is a value), fails with ``RedisError`` when the link is down or the reply is late."""
        d: Deferred = Deferred()
        if not self.up:
            d.errback(RedisError("redis: down"))
            return d
        self._outbox.append((args, d))
        self._schedule_flush()
        return d

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        conn = self.conn
        if not self._outbox:
            return
        if conn is None or not self.up:
            self._fail_outbox(RedisError("redis: down"))
            return
        batch, self._outbox = self._outbox, []
        replies = conn.pipeline([args for args, _ in batch])
        timer = self.reactor.callLater(self.timeout, self._late, conn)
        for (_, d), reply in zip(batch, replies):
            reply.chainDeferred(d)
        # The last reply answers for the whole batch (replies come in order).
        replies[-1].addBoth(_cancel, timer)

    def _late(self, conn: RedisProtocol) -> None:
        if conn.open:
            log.debug("queue backend redis {addr}: no answer within {timeout} s", addr=self.addr,
                      timeout=self.timeout)
            self._down(f"no answer within {self.timeout:g} s")
            conn.abort()

    def _fail_outbox(self, error: Exception) -> None:
        outbox, self._outbox = self._outbox, []
        for _, d in outbox:
            d.errback(error)


def _cancel(result: Any, timer: IDelayedCall) -> Any:
    if timer.active():
        timer.cancel()
    return result
