"""The supervisor's policy for worker processes, driven by a Clock and fake processes.

Restart with back-off (1 s doubling to 30 s, reset after a stable run), start-up failures that stop
the engine with the worker's code and line, clean stop (SIGTERM, then SIGKILL after the timeout),
signal fan-out.  The real processes are in test_workers.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from connmix_tx.supervisor import ExitStatus, Supervisor


class FakeProcess:
    """A worker handle: a pid and the signals it was sent."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise OSError("process exited already")
        self.signals.append(name)


class Harness:
    def __init__(self, count: int = 2, **kwargs: Any) -> None:
        self.clock = Clock()
        self.spawned: list[tuple[int, FakeProcess]] = []
        self.fatals: list[tuple[int, str]] = []
        self.next_pid = 100
        self.supervisor = Supervisor(count, self.spawn, self.clock, self.fatal, **kwargs)

    def spawn(self, index: int) -> FakeProcess:
        self.next_pid += 1
        process = FakeProcess(self.next_pid)
        self.spawned.append((index, process))
        return process

    def fatal(self, code: int, message: str) -> None:
        self.fatals.append((code, message))

    def current(self, index: int) -> FakeProcess:
        return [p for i, p in self.spawned if i == index][-1]

    def end(self, index: int, status: ExitStatus, line: str | None = None) -> None:
        self.current(index).pid = None
        self.supervisor.ended(index, status, line)

    def starts(self, index: int) -> int:
        return sum(1 for i, _ in self.spawned if i == index)


KILLED = ExitStatus(signal=9)


@pytest.fixture
def caplog_events() -> Any:
    """The formatted messages of every log event while the test runs."""
    messages: list[str] = []

    def observe(event: dict) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield messages
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.supervisor.start()
    for index in range(2):
        harness.supervisor.ready(index)
    return harness


def test_start_spawns_every_worker_once() -> None:
    harness = Harness(count=3)
    harness.supervisor.start()
    assert [i for i, _ in harness.spawned] == [0, 1, 2]
    assert harness.supervisor.pids() == [101, 102, 103]
    assert not harness.supervisor.all_ready
    for index in range(3):
        harness.supervisor.ready(index)
    assert harness.supervisor.all_ready


def test_a_killed_worker_is_logged_and_restarted_after_one_second(h: Harness, caplog_events: list) -> None:
    h.end(1, KILLED)
    assert h.starts(1) == 1
    assert h.supervisor.pids() == [101]
    h.clock.advance(0.9)
    assert h.starts(1) == 1
    h.clock.advance(0.1)
    assert h.starts(1) == 2
    assert h.supervisor.pids() == [101, 103]
    assert "worker 1 (pid 102) exited: killed by SIGKILL; restarting" in caplog_events
    assert h.fatals == []


def test_back_off_doubles_to_thirty_seconds_for_a_worker_that_keeps_crashing(h: Harness) -> None:
    delays = []
    for _ in range(8):
        h.end(0, ExitStatus(code=1))
        before = h.clock.seconds()
        while h.starts(0) == len(delays) + 1:
            h.clock.advance(0.5)
        delays.append(h.clock.seconds() - before)
        h.supervisor.ready(0)  # up again, but crashes at once
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_back_off_resets_after_a_stable_run(h: Harness) -> None:
    for _ in range(3):  # 1, 2, 4
        h.end(0, KILLED)
        h.clock.advance(30)
        h.supervisor.ready(0)
    h.clock.advance(10)  # stable now
    h.end(0, KILLED)
    h.clock.advance(1)
    assert h.starts(0) == 5


def test_a_worker_that_ends_cleanly_after_start_is_restarted_too(h: Harness) -> None:
    h.end(0, ExitStatus(code=0))
    h.clock.advance(1)
    assert h.starts(0) == 2


@pytest.mark.parametrize("code", [2, 3, 4])
def test_a_start_up_failure_stops_the_engine_with_its_code_and_line(code: int) -> None:
    harness = Harness()
    harness.supervisor.start()
    harness.supervisor.ready(0)
    harness.end(1, ExitStatus(code=code), "cannot listen on 127.0.0.1:6790 (engine.servers[0]): busy")
    assert harness.fatals == [(code, "cannot listen on 127.0.0.1:6790 (engine.servers[0]): busy")]
    harness.clock.advance(60)
    assert harness.starts(1) == 1  # no restart loop
    # The second worker failing the same way does not produce a second line.
    harness.end(0, ExitStatus(code=code), "other")
    assert len(harness.fatals) == 1


def test_a_start_up_failure_without_a_line_names_the_worker() -> None:
    harness = Harness()
    harness.supervisor.start()
    harness.end(0, ExitStatus(code=2))
    assert harness.fatals == [(2, "worker 0 (pid 101) exited: exit code 2")]


def test_a_worker_killed_before_it_was_ready_is_restarted_not_fatal() -> None:
    harness = Harness()
    harness.supervisor.start()
    harness.end(0, KILLED)
    harness.clock.advance(1)
    assert harness.fatals == [] and harness.starts(0) == 2


def test_a_restarted_worker_failing_at_start_is_retried_not_fatal(h: Harness) -> None:
    """Only the first start of a worker can stop the engine; later its siblings keep serving."""
    h.end(0, KILLED)
    h.clock.advance(1)
    h.end(0, ExitStatus(code=2), "config engine.servers[0].entry: file not found")
    assert h.fatals == []
    h.clock.advance(2)
    assert h.starts(0) == 3


def test_stop_terms_every_worker_and_fires_when_all_ended(h: Harness) -> None:
    done = h.supervisor.stop()
    assert [h.current(i).signals for i in range(2)] == [["TERM"], ["TERM"]]
    assert not done.called
    h.end(0, ExitStatus(code=0))
    assert not done.called
    h.end(1, ExitStatus(code=0))
    assert done.called
    h.clock.advance(60)
    assert h.starts(0) == h.starts(1) == 1
    assert h.clock.getDelayedCalls() == []


def test_stop_kills_a_worker_that_does_not_end_in_time(h: Harness) -> None:
    done = h.supervisor.stop()
    h.end(0, ExitStatus(code=0))
    h.clock.advance(3.9)
    assert h.current(1).signals == ["TERM"]
    h.clock.advance(0.1)
    assert h.current(1).signals == ["TERM", "KILL"]
    h.end(1, KILLED)
    assert done.called


def test_stop_cancels_a_pending_restart(h: Harness) -> None:
    h.end(0, KILLED)
    done = h.supervisor.stop()
    h.end(1, ExitStatus(code=0))
    assert done.called
    h.clock.advance(60)
    assert h.starts(0) == 1


def test_stop_with_no_worker_running_fires_at_once() -> None:
    harness = Harness()
    assert harness.supervisor.stop().called


def test_signal_all_reaches_every_running_worker(h: Harness) -> None:
    h.end(1, KILLED)
    h.supervisor.signal_all("HUP")
    assert h.current(0).signals == ["HUP"]
    assert h.current(1).signals == []  # ended: nothing to signal, no error


def test_a_spawn_failure_stops_the_engine() -> None:
    def spawn(index: int) -> FakeProcess:
        raise OSError(2, "No such file or directory")

    fatals: list[tuple[int, str]] = []
    Supervisor(2, spawn, Clock(), lambda code, text: fatals.append((code, text))).start()
    assert fatals[0] == (1, "cannot start worker 0: No such file or directory")


def test_exit_status_text() -> None:
    assert ExitStatus(code=3).describe() == "exit code 3"
    assert ExitStatus(signal=15).describe() == "killed by SIGTERM"
    assert ExitStatus(signal=200).describe() == "killed by signal 200"


def test_fatal_while_the_reactor_is_already_stopping_keeps_the_exit_code() -> None:
    """A worker told to stop (SIGTERM) whose registration deadline fires meanwhile exits quietly."""
    import io

    from twisted.internet.error import ReactorNotRunning

    from connmix_tx.service import Fatal

    class StoppingReactor:
        running = True
        triggers: list = []

        def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
            self.triggers.append((phase, event, args))

        def stop(self) -> None:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")

    reactor, stderr = StoppingReactor(), io.StringIO()
    Fatal(reactor, stderr)(4, "cannot reach center registry 127.0.0.1:1: connection refused")
    assert stderr.getvalue() == "connmix: cannot reach center registry 127.0.0.1:1: connection refused\n"
    assert reactor.triggers == [("after", "shutdown", (4,))]


def test_a_stop_signal_after_a_fatal_error_is_quiet() -> None:
    """SIGTERM from the supervisor reaching a worker that is already ending raises nothing."""
    from twisted.internet.error import ReactorNotRunning

    from connmix_tx.service import _stop_reactor

    class Stopped:
        def stop(self) -> None:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")

    _stop_reactor(Stopped())  # no exception: no "Unhandled Error" traceback in the log


# --------------------------------------------------------------------------- the process side


class FakePool:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.err: list[str] = []
        self.events: list[tuple] = []
        pool = self

        class Recorder:
            def ready(self, index: int) -> None:
                pool.events.append(("ready", index))

            def ended(self, index: int, status: ExitStatus, line: str | None) -> None:
                pool.events.append(("ended", index, status, line))

        self.supervisor = Recorder()
        self.relay_out = self.out.append
        self.relay_err = self.err.append


def test_worker_output_is_relayed_by_line_and_the_fatal_line_kept_for_the_supervisor() -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    from connmix_tx.workers import WorkerProtocol

    pool = FakePool()
    proto = WorkerProtocol(pool, 1)  # type: ignore[arg-type]
    proto.childDataReceived(1, b"line one\nline t")
    proto.childDataReceived(1, b"wo\npartial")
    proto.childDataReceived(2, b"a warning\nconnmix: cannot listen on 127.0.0.1:6790 (engine.servers[0]): busy\n")
    proto.childDataReceived(3, b"ready\n")
    assert pool.out == ["line one", "line two"]
    assert pool.err == ["a warning"]  # the fatal line is the supervisor's to print, once
    assert pool.events == [("ready", 1)]
    proto.processEnded(Failure(ProcessTerminated(exitCode=3)))
    assert pool.out[-1] == "partial"
    assert pool.events[-1] == ("ended", 1, ExitStatus(code=3),
                               "cannot listen on 127.0.0.1:6790 (engine.servers[0]): busy")


def test_a_worker_killed_by_a_signal_reports_it() -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    from connmix_tx.workers import WorkerProtocol

    pool = FakePool()
    WorkerProtocol(pool, 0).processEnded(Failure(ProcessTerminated(signal=9)))  # type: ignore[arg-type]
    assert pool.events == [("ended", 0, ExitStatus(signal=9), None)]


def test_a_worker_stops_when_its_supervisor_is_gone() -> None:
    from connmix_tx.workers import ParentWatch

    clock, parent, gone = Clock(), [100], []
    watch = ParentWatch(clock, lambda: gone.append(True), getppid=lambda: parent[0])
    watch.startService()
    clock.advance(5)
    assert gone == []
    parent[0] = 1  # re-parented to init: the supervisor died
    clock.advance(1)
    clock.advance(5)
    assert gone == [True]


def test_worker_command_line() -> None:
    import sys

    from connmix_tx.workers import worker_argv

    args = worker_argv("dev", "/etc/c.yaml", "engineid", 1, ("127.0.0.1", 6786), "/tmp/run", 2)
    assert args[0] == sys.executable
    assert args[3:] == ["-n", "--pidfile=", "connmix", "--role", "dev", "-f", "/etc/c.yaml", "-p", "2",
                        "--worker-of", "engineid", "--worker", "1", "--worker-dir", "/tmp/run",
                        "--center-registry", "127.0.0.1:6786"]
