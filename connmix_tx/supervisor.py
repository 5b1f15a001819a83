"""The supervisor's policy for the worker processes of a multi-process engine (docs/workers.md).

A plain class, no processes in it: ``Supervisor`` is told how to start worker ``i`` (``spawn``)
and is told when a worker became ready (``ready``) and when it ended (``ended``).  It decides:

* a worker that ends after it was ready once is logged
  ``worker {i} (pid {pid}) exited: {status}; restarting`` and started again after a back-off of
  1 s, doubling up to 30 s; a worker that stayed up ``stable`` seconds starts from 1 s again;
* a worker that fails before its first ready with an exit code of a start-up error (2 config,
  3 listen, 4 register) stops the whole engine with that code and the worker's one line (no
  restart loop); any other early end (a signal, a crash) is restarted like a late one;
* ``stop()`` sends SIGTERM to every worker, SIGKILL to those still running after
  ``stop_timeout``, and fires once every worker has ended; pending restarts are cancelled;
* ``signal_all("HUP")`` forwards a signal (the reload) to every running worker.

The Twisted side (``connmix_tx.workers``) turns real processes into these calls; tests drive it
with a ``Clock`` and fake handles.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from connmix_tx.errors import EXIT_USAGE, STARTUP_EXIT_CODES

log = Logger(namespace="connmix.supervisor")

MIN_BACKOFF, MAX_BACKOFF, STABLE_AFTER, STOP_TIMEOUT = 1.0, 30.0, 10.0, 4.0


class WorkerHandle(Protocol):
    """A started worker process: its pid and a way to signal it (``"TERM"``, ``"KILL"``, ``"HUP"``)."""

    pid: int | None

    def signalProcess(self, name: str) -> None: ...


@dataclass(frozen=True)
class ExitStatus:
    """How a worker process ended: an exit ``code``, or the ``signal`` that killed it."""

    code: int | None = None
    signal: int | None = None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signals.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exit code {self.code}"


class _Slot:
    """Worker ``index``: the running process, when it became ready, its back-off."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle: WorkerHandle | None = None
        self.pid: int | None = None
        self.ready_at: float | None = None
        self.was_ready = False
        self.backoff = MIN_BACKOFF
        self.restart: IDelayedCall | None = None
        self.starts = 0


class Supervisor:
    """Starts ``count`` workers, restarts the ones that end, stops them all on request.

    :param spawn: starts worker ``i`` and returns its handle; may raise ``OSError``.
    :param fatal: called once with ``(code, message)`` when a worker fails at start.
    :param on_ready: called with the index every time a worker becomes ready.
    """

    def __init__(
        self,
        count: int,
        spawn: Callable[[int], WorkerHandle],
        clock: IReactorTime,
        fatal: Callable[[int, str], None],
        on_ready: Callable[[int], None] | None = None,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        stable_after: float = STABLE_AFTER,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.slots = [_Slot(i) for i in range(count)]
        self.spawn = spawn
        self.clock = clock
        self.fatal = fatal
        self.on_ready = on_ready
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.stopping = False
        self.failed = False
        self._stopped: Deferred | None = None
        self._kill_call: IDelayedCall | None = None

    # Views -----------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Pids of the running workers, by index."""
        return [s.pid for s in self.slots if s.handle is not None and s.pid is not None]

    @property
    def all_ready(self) -> bool:
        return all(s.handle is not None and s.ready_at is not None for s in self.slots)

    # Events ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker."""
        for slot in self.slots:
            self._start(slot)

    def ready(self, index: int) -> None:
        """Worker ``index`` finished its start (listening, registered)."""
        slot = self.slots[index]
        if slot.handle is None or slot.ready_at is not None:
            return
        slot.ready_at = self.clock.seconds()
        slot.was_ready = True
        if self.on_ready is not None:
            self.on_ready(index)

    def ended(self, index: int, status: ExitStatus, line: str | None = None) -> None:
        """Worker ``index`` ended with ``status``; ``line`` is its fatal line (without ``connmix: ``)."""
        slot = self.slots[index]
        slot.handle = None
        ready_at, slot.ready_at = slot.ready_at, None
        pid = slot.pid
        if self.stopping or self.failed:
            self._check_stopped()
            return
        if not slot.was_ready and status.code in STARTUP_EXIT_CODES:
            self.failed = True
            self.fatal(status.code, line or f"worker {index} (pid {pid}) exited: {status.describe()}")
            return
        now = self.clock.seconds()
        if ready_at is not None and now - ready_at >= self.stable_after:
            slot.backoff = self.min_backoff
        delay = slot.backoff
        slot.backoff = min(slot.backoff * 2, self.max_backoff)
        log.warn("worker {worker} (pid {pid}) exited: {status}; restarting",
                 worker=index, pid=pid, status=status.describe(), delay=delay)
        slot.restart = self.clock.callLater(delay, self._restart, slot)

    # Actions ---------------------------------------------------------------------------------

    def signal_all(self, name: str) -> None:
        """Send signal ``name`` (``"HUP"``, ``"TERM"``, ``"KILL"``) to every running worker."""
        for slot in self.slots:
            if slot.handle is not None:
                try:
                    slot.handle.signalProcess(name)
                except Exception:
                    pass  # it ended meanwhile; ``ended`` will say so

    def stop(self) -> Deferred:
        """Stop every worker: SIGTERM, SIGKILL after ``stop_timeout``; fires when all ended."""
        self.stopping = True
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        if self._stopped is None:
            self._stopped = Deferred()
            self.signal_all("TERM")
            if self._running():
                self._kill_call = self.clock.callLater(self.stop_timeout, self._kill)
        self._check_stopped()
        return self._stopped if not self._stopped.called else succeed(None)

    def _running(self) -> bool:
        return any(slot.handle is not None for slot in self.slots)

    def _kill(self) -> None:
        self._kill_call = None
        for slot in self.slots:
            if slot.handle is not None:
                log.warn("worker {worker} (pid {pid}) did not stop; killing it",
                         worker=slot.index, pid=slot.pid)
        self.signal_all("KILL")

    def _check_stopped(self) -> None:
        if self._stopped is None or self._stopped.called or self._running():
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        self._stopped.callback(None)

    def _restart(self, slot: _Slot) -> None:
        slot.restart = None
        if not self.stopping and not self.failed:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.ready_at = None
        slot.starts += 1
        try:
            slot.handle = self.spawn(slot.index)
        except OSError as e:
            self.failed = True
            self.fatal(EXIT_USAGE, f"cannot start worker {slot.index}: {e.strerror or e}")
            return
        slot.pid = slot.handle.pid
        log.info("worker {worker} started (pid {pid})", worker=slot.index, pid=slot.pid)


def describe_status(value: Any) -> ExitStatus:
    """The ``ExitStatus`` of Twisted's ``ProcessDone`` / ``ProcessTerminated`` reason value."""
    return ExitStatus(code=getattr(value, "exitCode", None), signal=getattr(value, "signal", None))
