"""Tests for connmix_tx.engine.timeouts: the idle wheel (``readTimeout``, docs/operations.md)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from connmix_tx.engine.timeouts import TICK, IdleWheel

STEP = 0.01


class FakeConn:
    """A watched connection that records when the wheel closed it."""

    def __init__(self, clock: Clock, name: str = "c") -> None:
        self.clock = clock
        self.name = name
        self.last_received = clock.seconds()
        self.closed_at: list[float] = []

    def receive(self) -> None:
        self.last_received = self.clock.seconds()

    def idle_timeout(self) -> None:
        self.closed_at.append(self.clock.seconds())

    def __repr__(self) -> str:
        return f"FakeConn({self.name})"


def run_until(clock: Clock, until: float) -> None:
    """Advance in small steps, so a close is seen close to when it happens."""
    while clock.seconds() < until - 1e-9:
        clock.advance(min(STEP, until - clock.seconds()))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.mark.parametrize("start", [0.0, 0.1, 0.25, 3.33, 7.9])
@pytest.mark.parametrize("timeout", [1.0, 10.0, 60.0, 2.6])
def test_closes_within_timeout_and_timeout_plus_tick(clock, start, timeout) -> None:
    wheel = IdleWheel(clock, timeout)
    clock.advance(start)
    conn = FakeConn(clock)
    wheel.watch(conn)
    run_until(clock, start + timeout + TICK + STEP)
    assert len(conn.closed_at) == 1
    assert start + timeout <= conn.closed_at[0] <= start + timeout + TICK + 1e-9
    assert len(wheel) == 0


def test_not_closed_before_the_timeout(clock) -> None:
    wheel = IdleWheel(clock, 10)
    conn = FakeConn(clock)
    wheel.watch(conn)
    run_until(clock, 10 - STEP)
    assert conn.closed_at == []
    assert len(wheel) == 1


def test_activity_postpones(clock) -> None:
    wheel = IdleWheel(clock, 10)
    conn = FakeConn(clock)
    wheel.watch(conn)
    for moment in (4.0, 9.0, 13.7):
        run_until(clock, moment)
        conn.receive()  # only a timestamp: the wheel is not told
    run_until(clock, 13.7 + 10 - STEP)
    assert conn.closed_at == []
    run_until(clock, 13.7 + 10 + TICK + STEP)
    assert len(conn.closed_at) == 1
    assert 23.7 <= conn.closed_at[0] <= 23.7 + TICK + 1e-9


def test_each_connection_has_its_own_deadline(clock) -> None:
    wheel = IdleWheel(clock, 5)
    conns = []
    for i in range(4):
        conn = FakeConn(clock, str(i))
        wheel.watch(conn)
        conns.append((clock.seconds(), conn))
        run_until(clock, clock.seconds() + 1.3)
    run_until(clock, 20)
    for started, conn in conns:
        assert len(conn.closed_at) == 1
        assert started + 5 <= conn.closed_at[0] <= started + 5 + TICK + 1e-9
    assert [c.closed_at[0] for _, c in conns] == sorted(c.closed_at[0] for _, c in conns)


def test_forget_stops_watching(clock) -> None:
    wheel = IdleWheel(clock, 2)
    forgotten, kept = FakeConn(clock, "forgotten"), FakeConn(clock, "kept")
    wheel.watch(forgotten)
    wheel.watch(kept)
    assert len(wheel) == 2
    run_until(clock, 1)
    wheel.forget(forgotten)
    assert len(wheel) == 1
    run_until(clock, 100)
    assert forgotten.closed_at == []
    assert len(kept.closed_at) == 1
    assert clock.getDelayedCalls() == []  # nothing left to watch, no timer


def test_forget_then_watch_again_uses_the_new_deadline(clock) -> None:
    wheel = IdleWheel(clock, 2)
    conn = FakeConn(clock)
    wheel.watch(conn)
    run_until(clock, 1.5)
    wheel.forget(conn)
    conn.receive()
    wheel.watch(conn)
    run_until(clock, 3.5 - STEP)
    assert conn.closed_at == []
    run_until(clock, 3.5 + TICK + STEP)
    assert len(conn.closed_at) == 1


def test_timeout_zero_disables(clock) -> None:
    wheel = IdleWheel(clock, 0)
    conn = FakeConn(clock)
    wheel.watch(conn)
    assert len(wheel) == 0
    assert clock.getDelayedCalls() == []
    clock.advance(3600)
    assert conn.closed_at == []


def test_idle_timeout_is_called_once(clock) -> None:
    wheel = IdleWheel(clock, 1)
    conn = FakeConn(clock)
    wheel.watch(conn)
    run_until(clock, 10)
    assert len(conn.closed_at) == 1


def test_a_closing_connection_may_forget_itself(clock) -> None:
    wheel = IdleWheel(clock, 1)
    conns = [FakeConn(clock, str(i)) for i in range(3)]
    for conn in conns:
        conn.idle_timeout = lambda conn=conn: (conn.closed_at.append(clock.seconds()), wheel.forget(conn))
        wheel.watch(conn)
    run_until(clock, 2)
    assert [len(c.closed_at) for c in conns] == [1, 1, 1]


def test_stop_cancels_everything(clock) -> None:
    wheel = IdleWheel(clock, 1)
    conn = FakeConn(clock)
    wheel.watch(conn)
    wheel.stop()
    assert len(wheel) == 0
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert conn.closed_at == []


def test_one_timer_for_many_connections(clock) -> None:
    wheel = IdleWheel(clock, 30)
    for i in range(1000):
        wheel.watch(FakeConn(clock, str(i)))
    assert len(clock.getDelayedCalls()) == 1
