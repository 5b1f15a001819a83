"""connmix_tx.engine.redis_link on a Clock: back-off, logging once per change of state, commands
refused while down, and the pipeline of one turn in one write."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher, formatEvent

from connmix_tx.config import HostPort, RedisConfig
from connmix_tx.engine.redis_link import RedisLink
from connmix_tx.lua.redis import RedisError

CONFIG = RedisConfig(name="default", addr=HostPort("127.0.0.1", 6399), password="", db=0, pool_size=1,
                     min_idle_conns=0, max_conn_age=0, idle_timeout=0)


class Endpoint:
    """Refuses until ``accept`` is set; then connects a protocol to a StringTransport."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []
        self.accept = False
        self.protocol: Any = None

    def connect(self, factory: Any) -> Deferred:
        self.attempts.append(self.clock.seconds())
        if not self.accept:
            return fail(ConnectionRefusedError("refused"))
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


@pytest.fixture
def lines() -> Any:
    got: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "connmix.queue":
            got.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield got
    globalLogPublisher.removeObserver(observe)


def test_backoff_doubles_to_30_s_and_logs_down_once(lines) -> None:
    clock = Clock()
    endpoint = Endpoint(clock)
    link = RedisLink(CONFIG, clock, endpoint=endpoint)
    link.start()
    clock.pump([1] * 200)
    gaps = [b - a for a, b in zip(endpoint.attempts, endpoint.attempts[1:])]
    assert gaps[:7] == [1, 2, 4, 8, 16, 30, 30]
    assert len(lines) == 1 and lines[0].startswith("queue backend redis 127.0.0.1:6399 down: ")
    failed: list[Any] = []
    link.command([b"PING"]).addErrback(failed.append)
    assert failed and failed[0].check(RedisError)  # at once, no waiting while down
    endpoint.accept = True
    clock.advance(30)
    assert link.up and lines[-1] == "queue backend redis 127.0.0.1:6399 up" and len(lines) == 2
    link.stop()


def test_one_write_per_turn_and_reply_order(lines) -> None:
    clock = Clock()
    endpoint = Endpoint(clock)
    endpoint.accept = True
    ups: list[bool] = []
    link = RedisLink(CONFIG, clock, endpoint=endpoint, on_up=lambda: ups.append(True))
    link.start()
    assert link.up and ups == [True]
    replies: list[Any] = []
    for i in range(3):
        link.command([b"ECHO", b"%d" % i]).addCallback(replies.append)
    assert endpoint.transport.value() == b""  # nothing before the end of the turn
    writes: list[bytes] = []
    endpoint.transport.write = writes.append  # type: ignore[method-assign]
    clock.advance(0)
    assert writes == [b"*2\r\n$4\r\nECHO\r\n$1\r\n0\r\n*2\r\n$4\r\nECHO\r\n$1\r\n1\r\n*2\r\n$4\r\nECHO\r\n$1\r\n2\r\n"]
    endpoint.protocol.dataReceived(b"$1\r\n0\r\n$1\r\n1\r\n$1\r")
    endpoint.protocol.dataReceived(b"\n2\r\n")
    assert replies == [b"0", b"1", b"2"]
    link.stop()


def test_no_answer_within_the_timeout_takes_the_link_down(lines) -> None:
    clock = Clock()
    endpoint = Endpoint(clock)
    endpoint.accept = True
    downs: list[bool] = []
    link = RedisLink(CONFIG, clock, endpoint=endpoint, on_down=lambda: downs.append(True))
    link.start()
    failed: list[Any] = []
    link.command([b"PING"]).addErrback(failed.append)
    clock.advance(0)
    clock.advance(2)
    assert endpoint.transport.disconnecting or not link.up
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    endpoint.protocol.connectionLost(Failure(ConnectionLost()))
    assert failed and failed[0].check(RedisError)
    assert not link.up and downs == [True]
    assert [l for l in lines if " down: " in l] == ["queue backend redis 127.0.0.1:6399 down: no answer within 2 s"]
    link.stop()
