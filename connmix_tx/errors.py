"""Exit codes and fatal errors: how the process ends when it cannot go on (docs/operations.md).

Every fatal error writes exactly one line ``connmix: <reason>`` to stderr (and the log) and ends
the process with one of the codes below, without a traceback.  Before the reactor runs, code
raises ``FatalError`` and the tap (or the root's ``privilegedStartService``) turns it into
``SystemExit``; inside the running reactor, ``Fatal`` stops the reactor and exits with the code
once it has stopped.  A supervisor recognises a worker's fatal line by ``FATAL_PREFIX``.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from connmix_tx.reactors import IReactor

#: A clean stop (SIGTERM / SIGINT) and ``--version``.
EXIT_OK = 0
#: A command-line usage error (twistd's convention); also any other failure (a worker that
#: cannot be spawned).
EXIT_USAGE = 1
#: A configuration error: file, YAML, key, value, entry script, TLS files, log file.
EXIT_CONFIG = 2
#: A listener cannot bind.
EXIT_LISTEN = 3
#: The engine cannot register at the center (unreachable, refused, node number lost).
EXIT_REGISTER = 4
#: The codes of start-up errors: a worker failing with one of them stops its whole engine.
STARTUP_EXIT_CODES = (EXIT_CONFIG, EXIT_LISTEN, EXIT_REGISTER)
#: How every fatal line starts.
FATAL_PREFIX = "connmix: "

log = Logger(namespace="connmix.engine")


class FatalError(Exception):
    """A start-up error that ends the process with ``code`` after one line ``connmix: <message>``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def write_fatal_line(message: str, stream: TextIO | None = None) -> None:
    """Write the one line of a fatal error to stderr."""
    out = stream or sys.__stderr__
    if out is None:
        return
    out.write(f"{FATAL_PREFIX}{message}\n")
    out.flush()


def exit_with(error: FatalError) -> SystemExit:
    """Write ``error``'s line; the ``SystemExit`` to raise before the reactor runs."""
    write_fatal_line(error.message)
    return SystemExit(error.code)


class Fatal:
    """Ends the process from inside the running reactor with an exit code.

    Called with ``(code, message)``; only the first call counts.  The reactor is stopped (the
    service tree stops cleanly) and the process exits with ``code`` after the shutdown.
    """

    def __init__(self, reactor: IReactor, stderr: TextIO | None = None) -> None:
        self.reactor = reactor
        self.stderr = stderr
        self.code: int | None = None

    def __call__(self, code: int, message: str) -> None:
        if self.code is not None:
            return
        self.code = code
        write_fatal_line(message, self.stderr)
        log.error("{message}", message=message)
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now, code)
        if self.reactor.running:
            stop_reactor(self.reactor)  # already stopping after a signal: the exit code still applies


def stop_reactor(reactor: IReactor) -> None:
    """Stop the reactor unless it is stopping already (a fatal error, or a second signal)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)
