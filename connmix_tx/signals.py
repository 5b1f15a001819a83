"""Process signals as one small service: SIGTERM / SIGINT stop cleanly, SIGHUP reloads.

twistd would re-raise a stop signal after the reactor stops, so the process would end "killed
by SIGTERM" instead of exiting 0 (docs/operations.md): ``SignalHandlers`` installs its own
handlers once the reactor runs (the reactor installs its own at start, we replace them).  A stop
signal stops the reactor, which stops the tree cleanly; SIGHUP calls ``reload`` on the reactor
thread, so reloads never overlap.  A worker ignores SIGINT: Ctrl-C in a terminal reaches the
whole process group, and the supervisor alone decides (it sends SIGTERM).
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application import service
from twisted.logger import Logger

from connmix_tx.errors import stop_reactor
from connmix_tx.reactors import IReactor

log = Logger(namespace="connmix.engine")


class SignalHandlers(service.Service):
    """Installs the process's signal handlers when the reactor runs.

    :param reload: what SIGHUP runs (``Reloader.reload``), or None to leave SIGHUP alone.
    :param ignore_interrupt: ignore SIGINT (a worker process).
    :param install: ``signal.signal`` (tests record the calls instead).
    """

    def __init__(
        self, reactor: IReactor, reload: Callable[[], None] | None, ignore_interrupt: bool = False,
        install: Callable[[int, Any], Any] = signal.signal,
    ) -> None:
        self.setName("signals")
        self.reactor = reactor
        self.reload = reload
        self.ignore_interrupt = ignore_interrupt
        self._install = install

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self.install)

    def install(self) -> None:
        """Replace the reactor's handlers with ours."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._install(signum, self._stop)
        if self.ignore_interrupt:
            self._install(signal.SIGINT, signal.SIG_IGN)
        if self.reload is not None:
            self._install(signal.SIGHUP, self._hangup)

    def _stop(self, signum: int, frame: Any) -> None:
        log.info("received {signal}, stopping", signal=signal.Signals(signum).name)
        self.reactor.callFromThread(stop_reactor, self.reactor)

    def _hangup(self, signum: int, frame: Any) -> None:
        assert self.reload is not None
        self.reactor.callFromThread(self.reload)
