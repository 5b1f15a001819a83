"""Worker processes of a multi-process engine, both sides of the pipe (docs/workers.md).

Supervisor side: ``WorkerPool`` is the child service of the supervisor's tree.  It starts each
worker as ``twistd -n --pidfile= connmix --role ROLE -f FILE --worker-of ENGINE --worker I``
with the same interpreter (``reactor.spawnProcess`` of ``sys.executable``), relays the worker's
stdout lines into the supervisor's log destinations, keeps the worker's fatal ``connmix: ...``
line from its stderr (relaying every other stderr line), and learns that the worker is ready
from one line on the worker's fd 3.  The restart and stop policy is ``connmix_tx.supervisor``.

Worker side: ``WorkerRole`` describes the process as a worker (engine id, index, the center to
dial); ``report_ready`` writes the ready line on fd 3; ``ParentWatch`` stops the worker when its
supervisor is gone (the parent pid changed), so a killed supervisor leaves no orphans.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from connmix_tx.errors import FATAL_PREFIX
from connmix_tx.reactors import IReactor
from connmix_tx.supervisor import Supervisor, describe_status

log = Logger(namespace="connmix.supervisor")

#: The worker's end of the ready pipe.
READY_FD = 3
READY_LINE = b"ready\n"
#: How the supervisor runs twistd with its own interpreter (``twistd.py`` has no ``__main__``).
TWISTD_BOOT = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


@dataclass(frozen=True)
class WorkerRole:
    """What makes this process worker ``index`` of engine ``engine``.

    ``center`` is the ``host:port`` of the supervisor's in-process registry (dev / single), or
    None to dial ``engine.centerRegistry`` (role engine).
    """

    engine: str
    index: int
    center: tuple[str, int] | None = None
    #: The engine's private run directory (the workers' metrics sockets), made by the supervisor.
    directory: str | None = None
    #: The role the engine runs as (its listeners decide the workers' mesh ports).
    role: str = "engine"


def report_ready() -> None:
    """Tell the supervisor this worker is ready (one line on fd 3); a no-op without the pipe."""
    try:
        os.write(READY_FD, READY_LINE)
        os.close(READY_FD)
    except OSError:
        pass


class ParentWatch(service.Service):
    """Calls ``gone`` once when the parent process changes (the supervisor died)."""

    def __init__(self, clock: IReactorTime, gone: Callable[[], None], interval: float = 1.0,
                 getppid: Callable[[], int] = os.getppid) -> None:
        self.getppid = getppid
        self.parent_pid = getppid()
        self.gone = gone
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if self.getppid() != self.parent_pid:
            if self._loop.running:
                self._loop.stop()
            log.warn("supervisor (pid {pid}) is gone; stopping", pid=self.parent_pid)
            self.gone()


class _LineBuffer:
    """Splits a byte stream into text lines."""

    def __init__(self, line: Callable[[str], None]) -> None:
        self.line = line
        self.pending = b""

    def feed(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for raw in lines:
            self.line(raw.decode("utf-8", "replace"))

    def flush(self) -> None:
        if self.pending:
            raw, self.pending = self.pending, b""
            self.line(raw.decode("utf-8", "replace"))


class WorkerProtocol(ProcessProtocol):
    """One worker process as the supervisor sees it."""

    #: Set once the process is spawned.
    transport: IProcessTransport

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.fatal_line: str | None = None
        self._out = _LineBuffer(pool.relay_out)
        self._err = _LineBuffer(self._stderr_line)

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._out.feed(data)
        elif childFD == 2:
            self._err.feed(data)
        elif childFD == READY_FD and READY_LINE.strip() in data:
            self.pool.supervisor.ready(self.index)

    def _stderr_line(self, line: str) -> None:
        if line.startswith(FATAL_PREFIX):
            self.fatal_line = line[len(FATAL_PREFIX):]  # the supervisor decides whether to show it
        else:
            self.pool.relay_err(line)

    def processEnded(self, reason: Any) -> None:
        self._out.flush()
        self._err.flush()
        self.pool.supervisor.ended(self.index, describe_status(reason.value), self.fatal_line)


class WorkerPool(service.Service):
    """The supervisor's workers as a child service: started with the tree, stopped with it."""

    def __init__(
        self,
        count: int,
        argv: Callable[[int], list[str]],
        reactor: IReactor,
        fatal: Callable[[int, str], None],
        relay_out: Callable[[str], None],
        relay_err: Callable[[str], None] | None = None,
    ) -> None:
        self.setName("workers")
        self.count = count
        self.argv = argv
        self.reactor = reactor
        self.relay_out = relay_out
        self.relay_err = relay_err or _write_stderr
        self.supervisor = Supervisor(count, self._spawn, reactor, fatal)
        #: The engine's private run directory (mode 0700), removed when the workers stopped.
        self.directory: str | None = None
        #: The engine id every worker registers under (set by the supervisor part).
        self.engine_id = ""

    def _spawn(self, index: int) -> Any:
        args = self.argv(index)
        return self.reactor.spawnProcess(
            WorkerProtocol(self, index), sys.executable, args, env=dict(os.environ), path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r", READY_FD: "r"},
        )

    def startService(self) -> None:
        super().startService()
        self.directory = tempfile.mkdtemp(prefix="connmix-engine-")
        self.supervisor.start()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.supervisor.stop().addBoth(self._remove_directory)

    def _remove_directory(self, result: Any) -> Any:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        return result

    def forward(self, name: str) -> None:
        """Forward a signal (``"HUP"``) to every worker."""
        self.supervisor.signal_all(name)

    def reconfigure(self, old: Any, new: Any) -> None:
        """SIGHUP: the file validated here (as the workers will validate it); each worker reloads it."""
        self.forward("HUP")


def _write_stderr(line: str) -> None:
    stream = sys.__stderr__
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


def worker_argv(role: str, source: str, engine: str, index: int, center: tuple[str, int] | None,
                directory: str | None = None, count: int = 1) -> list[str]:
    """The command line of worker ``index`` of ``count``: twistd in the foreground, no pid file.

    ``-p count`` makes the worker validate the file exactly as its supervisor did.
    """
    args = [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=", "connmix", "--role", role,
            "-f", source, "-p", str(count), "--worker-of", engine, "--worker", str(index)]
    if directory:
        args += ["--worker-dir", directory]
    if center is not None:
        host, port = center
        args += ["--center-registry", f"{host}:{port}"]
    return args
