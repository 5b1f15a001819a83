"""``mix.redis`` (docs/lua-api.md, "Redis") against a real redis-server, plus the RESP parser alone.

The server's address comes from ``CONNMIX_TEST_REDIS`` (``.ci/run`` starts one); without it the
tests start their own ``redis-server`` on a free loopback port when the binary exists, and are
skipped (saying why) when neither works.  Scripts run in a real ``Script`` (``make_engine``);
the pools use the real reactor, except where a test drives their timers with a ``Clock``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from connmix_tx.config import HostPort, RedisConfig
from connmix_tx.lua.redis import (
    ProtocolError,
    RedisPool,
    RedisPools,
    RedisProtocol,
    ReplyError,
    RespParser,
    encode_command,
)
from connmix_tx.testing import free_port
from luahelpers import Engine, make_engine


def config(address: HostPort, name: str = "default", **changes: Any) -> RedisConfig:
    values = dict(name=name, addr=address, password="", db=0, pool_size=20, min_idle_conns=10,
                  max_conn_age=0, idle_timeout=300)
    values.update(changes)
    return RedisConfig(**values)


@pytest_twisted.async_yield_fixture
async def engine(tmp_path: Path, redis_address: HostPort) -> AsyncIterator[Engine]:
    from twisted.internet import reactor

    made = make_engine(tmp_path)
    made.library.redis = RedisPools(
        [config(redis_address), config(redis_address, "small", pool_size=2),
         config(redis_address, "db1", db=1)],
        reactor,
    )
    yield made
    made.library.redis.close()


def run(engine: Engine, code: str, conn: Any = None) -> Deferred:
    """Run ``code`` in on_message; the Deferred fires with its results or fails with its error."""
    finished: Deferred = Deferred()

    def done(ok: bool, value: Any) -> None:
        if ok:
            finished.callback(value)
        else:
            finished.errback(AssertionError(value))

    engine.script.run_message(conn.cid if conn else b"", b"text", code.encode(), done)
    return finished


@pytest.fixture
def key() -> str:
    """A key prefix no other test uses."""
    return f"connmix-test:{uuid.uuid4().hex}:"


# --- reply mapping ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_get_and_nil(engine: Engine, key: str) -> None:
    code = f"""
        local r = mix.redis.connection("default")
        local ok, e1 = r:command("SET", "{key}a", "value")
        local v, e2 = r:command("GET", "{key}a")
        local missing, e3 = r:command("GET", "{key}missing")
        return ok, e1, v, e2, missing, e3
    """
    assert await run(engine, code) == (b"OK", None, b"value", None, None, None)


@pytest_twisted.ensureDeferred
async def test_integers_and_number_arguments(engine: Engine, key: str) -> None:
    code = f"""
        local r = mix.redis.connection("default")
        local a = r:command("INCR", "{key}n")
        local b = r:command("INCRBY", "{key}n", 41)
        local f = r:command("INCRBYFLOAT", "{key}f", 1.5)
        local big = r:command("SET", "{key}big", 123456789012345)
        return a, b, f, (r:command("GET", "{key}big"))
    """
    assert await run(engine, code) == (1, 42, b"1.5", b"123456789012345")


@pytest_twisted.ensureDeferred
async def test_arrays(engine: Engine, key: str) -> None:
    code = f"""
        local r = mix.redis.connection("default")
        local n = r:command("LPUSH", "{key}list", "a", "b", "c")
        local list = r:command("LRANGE", "{key}list", 0, -1)
        r:command("HSET", "{key}h", "f1", "v1")
        local hash = r:command("HGETALL", "{key}h")
        local empty = r:command("LRANGE", "{key}none", 0, -1)
        return n, table.concat(list, ","), #hash, hash[1], hash[2], #empty, type(empty)
    """
    assert await run(engine, code) == (3, b"c,b,a", 2, b"f1", b"v1", 0, b"table")


@pytest_twisted.ensureDeferred
async def test_nested_arrays_status_and_nil_elements(engine: Engine, key: str) -> None:
    script = "return {1, {2, 'x'}, redis.status_reply('FINE'), false, 5}"
    code = f"""
        local r = mix.redis.connection("default")
        local v, err = r:command("EVAL", "{script}", 0)
        local m = r:command("MGET", "{key}none", "{key}none2")
        return v[1], v[2][1], v[2][2], v[3], v[4], v[5], err, m[1], m[2]
    """
    assert await run(engine, code) == (1, 2, b"x", b"FINE", None, 5, None, None, None)


@pytest_twisted.ensureDeferred
async def test_error_replies(engine: Engine, key: str) -> None:
    code = f"""
        local r = mix.redis.connection("default")
        r:command("SET", "{key}s", "text")
        local a, e1 = r:command("INCR", "{key}s")
        local b, e2 = r:command("LPUSH", "{key}s", "x")
        local c, e3 = r:command("NOSUCHCOMMAND")
        return a, e1, b, e2, c, e3
    """
    a, e1, b, e2, c, e3 = await run(engine, code)
    assert a is None and e1 == b"ERR value is not an integer or out of range"
    assert b is None and e2.startswith(b"WRONGTYPE ")
    assert c is None and e3.startswith(b"ERR unknown command")


@pytest_twisted.ensureDeferred
async def test_db_is_selected(engine: Engine, key: str) -> None:
    code = f"""
        mix.redis.connection("db1"):command("SET", "{key}db", "one")
        return (mix.redis.connection("db1"):command("GET", "{key}db")),
               (mix.redis.connection("default"):command("GET", "{key}db"))
    """
    assert await run(engine, code) == (b"one", None)


# --- errors -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_connection(engine: Engine) -> None:
    assert await run(engine, 'return mix.redis.connection("nope")') == (None, b"unknown redis connection: nope")


@pytest_twisted.ensureDeferred
async def test_connection_refused(tmp_path: Path) -> None:
    from twisted.internet import reactor

    engine = make_engine(tmp_path)
    engine.library.redis = RedisPools([config(HostPort("127.0.0.1", free_port()))], reactor)
    code = 'return mix.redis.connection("default"):command("PING")'
    assert await run(engine, code) == (None, b"redis: connection refused")
    assert engine.library.redis.pool("default").size == 0


@pytest_twisted.ensureDeferred
async def test_authentication_failure_is_a_redis_error(tmp_path: Path, redis_address: HostPort) -> None:
    from twisted.internet import reactor

    engine = make_engine(tmp_path)
    engine.library.redis = RedisPools([config(redis_address, password="wrong")], reactor)
    value, err = await run(engine, 'return mix.redis.connection("default"):command("PING")')
    assert value is None and err.startswith(b"redis: ERR ") or err.startswith(b"redis: WRONGPASS"), err
    assert engine.library.redis.pool("default").size == 0


@pytest_twisted.ensureDeferred
async def test_no_reply_in_time_is_a_timeout(tmp_path: Path, redis_address: HostPort, key: str) -> None:
    from twisted.internet import reactor

    engine = make_engine(tmp_path)
    engine.library.redis = pools = RedisPools([config(redis_address)], reactor, timeout=0.3)
    try:
        code = f'return mix.redis.connection("default"):command("BLPOP", "{key}never", 0)'
        assert await run(engine, code) == (None, b"redis: timeout")
        # The connection that timed out is dropped, so a late reply cannot answer another command.
        assert await run(engine, 'return mix.redis.connection("default"):command("PING")') == (b"PONG", None)
        assert pools.pool("default").size == 1
    finally:
        pools.close()


@pytest_twisted.ensureDeferred
async def test_connection_state_commands_are_refused(engine: Engine) -> None:
    for command in ("SUBSCRIBE", "multi", "Select"):
        code = f'return mix.redis.connection("default"):command("{command}", "x")'
        assert await run(engine, code) == (None, f"redis: {command.lower()} is not supported".encode())


@pytest.mark.parametrize("call, message", [
    ('r:command()', b"bad argument #1 to 'command' (string expected, got no value)"),
    ('r:command("GET", {})', b"bad argument #2 to 'command' (string or number expected, got table)"),
    ('r:command("SET", "k", true)', b"bad argument #3 to 'command' (string or number expected, got boolean)"),
    ('r.command("GET", "k")', b"redis object expected"),
    ('mix.redis.connection({})', b"bad argument #1 to 'connection' (string expected, got table)"),
])
@pytest_twisted.ensureDeferred
async def test_bad_arguments_raise(engine: Engine, call: str, message: bytes) -> None:
    code = f"""
        local r = mix.redis.connection("default")
        return pcall(function()
          local v, e = {call}
          return v, e
        end)
    """
    ok, err = await run(engine, code)
    assert ok is False and message in err, err
    assert err.startswith(b"exec:4: "), err


@pytest_twisted.ensureDeferred
async def test_commands_cannot_wait_outside_engine_coroutines(engine: Engine) -> None:
    code = """
        local r = mix.redis.connection("default")
        return coroutine.resume(coroutine.create(function() return r:command("PING") end))
    """
    ok, err = await run(engine, code)
    assert ok is False and err.endswith(b"cannot wait here")
    assert engine.library.redis.pool("default").size == 0  # nothing was sent


# --- the pool -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_are_reused(engine: Engine) -> None:
    code = """
        local r = mix.redis.connection("default")
        local a = r:command("CLIENT", "ID")
        local b = r:command("CLIENT", "ID")
        local c = mix.redis.connection("default"):command("CLIENT", "ID")
        return a, b, c
    """
    first, second, third = await run(engine, code)
    assert first == second == third
    assert (await run(engine, 'return (mix.redis.connection("default"):command("CLIENT", "ID"))')) == (first,)
    assert engine.library.redis.pool("default").size == 1


@pytest_twisted.ensureDeferred
async def test_pool_size_bounds_concurrent_connections(engine: Engine, key: str) -> None:
    pool = engine.library.redis.pool("small")
    sizes = []
    runs = []
    for i in range(6):
        conn, _ = engine.connect()
        runs.append(run(engine, f'return mix.redis.connection("small"):command("INCR", "{key}c")', conn))
        sizes.append(pool.size)
    results = [await r for r in runs]
    assert sorted(v for (v, _err) in results) == [1, 2, 3, 4, 5, 6]
    assert max(sizes) == 2 and pool.size == 2 and len(pool.idle) == 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_after_idle_timeout(tmp_path: Path, redis_address: HostPort) -> None:
    from twisted.internet import reactor

    clock = Clock()  # the pool's timers; the connections themselves use the reactor
    cfg = config(redis_address, idle_timeout=30)
    pool = RedisPool(cfg, clock, endpoint=HostnameEndpoint(reactor, redis_address.host, redis_address.port))
    try:
        first = await pool.command([b"CLIENT", b"ID"])
        assert await pool.command([b"CLIENT", b"ID"]) == first and len(pool.idle) == 1
        clock.advance(29)
        assert len(pool.idle) == 1
        conn = pool.idle[0].conn
        clock.advance(1)
        assert pool.idle == [] and pool.size == 0
        while conn.open:  # wait for the close to complete
            await _later(reactor)
        assert await pool.command([b"CLIENT", b"ID"]) != first
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_max_conn_age_retires_old_connections(redis_address: HostPort) -> None:
    from twisted.internet import reactor

    clock = Clock()
    pool = RedisPool(config(redis_address, max_conn_age=60), clock,
                     endpoint=HostnameEndpoint(reactor, redis_address.host, redis_address.port))
    try:
        first = await pool.command([b"CLIENT", b"ID"])
        assert await pool.command([b"CLIENT", b"ID"]) == first
        clock.advance(61)
        assert await pool.command([b"CLIENT", b"ID"]) == first  # retired when released
        assert pool.size == 0
        assert await pool.command([b"CLIENT", b"ID"]) != first
    finally:
        pool.close()


def _later(reactor: Any) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


def test_start_up_needs_no_redis() -> None:
    """Pools are made on first use and connect on the first command."""
    clock = Clock()
    pools = RedisPools([config(HostPort("127.0.0.1", 1))], clock)
    assert "default" in pools and pools.pools == {}
    assert clock.getDelayedCalls() == []


# --- RESP, without a socket ---------------------------------------------------------------------


def test_parser_handles_replies_split_anywhere() -> None:
    stream = b"+OK\r\n-ERR bad\r\n:42\r\n$5\r\nhel\r\n\r\n$-1\r\n*3\r\n$1\r\na\r\n*1\r\n:1\r\n$-1\r\n*-1\r\n$0\r\n\r\n"
    parser = RespParser()
    replies = []
    for i in range(len(stream)):
        replies.extend(parser.feed(stream[i:i + 1]))
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ReplyError) and str(replies[1]) == "ERR bad"
    assert replies[2:] == [42, b"hel\r\n", None, [b"a", [1], None], None, b""]
    assert RespParser().feed(stream)[2:] == replies[2:]


def test_parser_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        RespParser().feed(b"?what\r\n")
    with pytest.raises(ProtocolError):
        RespParser().feed(b":x\r\n")


def test_encode_command() -> None:
    assert encode_command([b"SET", b"k", b"a b"]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\na b\r\n"


def _connected() -> tuple[RedisProtocol, StringTransport]:
    protocol, transport = RedisProtocol(), StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_protocol_matches_replies_in_order() -> None:
    protocol, transport = _connected()
    first, second = protocol.execute([b"GET", b"a"]), protocol.execute([b"GET", b"b"])
    assert transport.value() == encode_command([b"GET", b"a"]) + encode_command([b"GET", b"b"])
    protocol.dataReceived(b"$1\r\nA\r\n$-")
    assert first.result == b"A" and not second.called
    protocol.dataReceived(b"1\r\n")
    assert second.result is None and protocol.idle


def test_garbage_or_an_unexpected_reply_drops_the_connection() -> None:
    for data in (b"?what\r\n", b"+OK\r\n+EXTRA\r\n"):
        protocol, transport = _connected()
        pending = protocol.execute([b"PING"])
        protocol.dataReceived(data)
        assert transport.disconnecting or transport.disconnected
        protocol.connectionLost(Failure(ConnectionLost()))
        assert pending.called and not protocol.idle
        pending.addErrback(lambda f: None)


def test_parser_large_reply_in_many_chunks() -> None:
    # hiredis keeps its own buffer: a 4 MiB array of 4 KiB bulk strings fed in 1 KiB chunks.
    items = [bytes([65 + i % 26]) * 4096 for i in range(1024)]
    stream = b"*1024\r\n" + b"".join(b"$4096\r\n" + item + b"\r\n" for item in items) + b":7\r\n"
    parser = RespParser()
    replies = []
    for i in range(0, len(stream), 1024):
        replies.extend(parser.feed(stream[i:i + 1024]))
    assert replies == [items, 7]
