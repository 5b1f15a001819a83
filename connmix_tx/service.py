"""The service tree: the root ``ConnmixService`` and which parts run for which role.

``ROLE_PARTS`` maps a role to its parts (a table, not if-chains): ``center`` (registry + center
API, ``connmix_tx.parts.center``) and ``engine`` (``connmix_tx.parts.engine``); dev and single run
both in one tree.  With more than one worker process an engine runs as a supervisor
(``workers``) and each worker process runs the engine part alone (``connmix_tx.parts.supervisor``,
docs/workers.md).  Every long-lived object is a child service somewhere below the root; a SIGHUP
reload walks the tree and calls ``reconfigure(old, new)`` on every child that has one
(``connmix_tx.tree``, ``connmix_tx.reload``).  ``connmix_tx.tree.outline`` prints the tree.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet.defer import maybeDeferred

from connmix_tx.auth import AccessControl
from connmix_tx.config import Config, worker_count
from connmix_tx.errors import (
    EXIT_CONFIG, EXIT_LISTEN, EXIT_REGISTER, Fatal, FatalError, exit_with, stop_reactor, write_fatal_line,
)
from connmix_tx.listeners import Listener, endpoint_string, server_endpoint
from connmix_tx.parts.center import CenterPart
from connmix_tx.parts.engine import STOP_GRACE, EnginePart
from connmix_tx.parts.servers import SERVER_FACTORIES
from connmix_tx.parts.supervisor import add_supervisor, add_worker
from connmix_tx.reactors import IReactor
from connmix_tx.workers import WorkerPool, WorkerRole

#: The old private name of ``connmix_tx.errors.stop_reactor``.
_stop_reactor = stop_reactor

#: What this room defines, and the names of the tree's pieces callers have found here.
__all__ = [
    "ConnmixService", "ROLE_PARTS", "add_center", "add_engine", "CenterPart", "EnginePart", "Listener",
    "SERVER_FACTORIES", "STOP_GRACE", "EXIT_CONFIG", "EXIT_LISTEN", "EXIT_REGISTER", "Fatal", "FatalError",
    "endpoint_string", "server_endpoint", "write_fatal_line",
]


class ConnmixService(service.MultiService):
    """The root service: the parts of the role, in start order.

    With more than one worker process (``processes``, the ``-p`` value, else ``engine.workers``)
    an engine role runs as a supervisor: the center part in dev / single, then a ``WorkerPool``
    in place of the engine part.  A process started as a worker (``worker``) runs the engine part
    only, on the ports it shares with its siblings (docs/workers.md).

    The root owns the access control every API listener of the process shares; its
    ``reconfigure`` replaces it on SIGHUP before the parts see the new configuration.
    """

    def __init__(
        self,
        config: Config,
        role: str,
        reactor: IReactor,
        fatal: Callable[[int, str], None],
        processes: int | None = None,
        worker: WorkerRole | None = None,
        relay: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.role = role
        self.center: CenterPart | None = None
        self.engine: EnginePart | None = None
        #: The supervisor's worker processes (None in a one-process engine and in a worker).
        self.workers: WorkerPool | None = None
        self.worker = worker
        self.processes = processes
        self.worker_count = worker_count(config.engine.workers if processes is None else processes)
        #: Where a supervisor writes its workers' log lines.
        self.relay = relay or _print_line
        #: One access control for every API listener of the process (hot on SIGHUP).
        self.access = AccessControl(config.access)
        for add in ROLE_PARTS[role][self.mode]:
            add(self, config, reactor, fatal)

    @property
    def mode(self) -> str:
        """``process`` (one engine process), ``supervisor`` or ``worker``."""
        if self.worker is not None:
            return "worker"
        if self.worker_count > 1 and self.role != "center":
            return "supervisor"
        return "process"

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except FatalError as e:
            raise exit_with(e) from None

    def stopService(self) -> Any:
        """Stop the tree; a supervisor stops its workers first, so they unregister from a live center."""
        workers = self.workers
        if workers is None or not workers.running:
            return super().stopService()
        stopping = maybeDeferred(workers.stopService)
        return stopping.addBoth(lambda _: super(ConnmixService, self).stopService())

    def reconfigure(self, old: Config, new: Config) -> None:
        """SIGHUP: ``new`` is the running configuration; ``access`` applies to the next request."""
        self.config = new
        if new.access != old.access:
            self.access.replace(new.access)


def add_center(root: ConnmixService, config: Config, reactor: IReactor, fatal: Callable[[int, str], None]) -> None:
    """The center part: registry and center API."""
    root.center = CenterPart(config, reactor, root.access)
    root.center.setServiceParent(root)


def add_engine(root: ConnmixService, config: Config, reactor: IReactor, fatal: Callable[[int, str], None]) -> None:
    """The engine part; in dev / single it dials the in-process registry over loopback."""
    center = root.center
    if center is not None:
        def address() -> tuple[str, int]:
            return "127.0.0.1", center.registry_listener.actual_port
    else:
        target = config.engine.center_registry

        def address() -> tuple[str, int]:
            return target.host, target.port

    root.engine = EnginePart(
        config, reactor, fatal, address, in_process_center=center is not None, access=root.access
    )
    root.engine.setServiceParent(root)


def _print_line(line: str) -> None:
    print(line, flush=True)


PartAdder = Callable[[ConnmixService, Config, Any, Callable[[int, str], None]], None]

#: Role -> process mode -> the parts it runs, in start order.  A worker runs the engine part only.
ROLE_PARTS: dict[str, dict[str, tuple[PartAdder, ...]]] = {
    "center": {"process": (add_center,)},
    "engine": {"process": (add_engine,), "supervisor": (add_supervisor,), "worker": (add_worker,)},
    "dev": {"process": (add_center, add_engine), "supervisor": (add_center, add_supervisor),
            "worker": (add_worker,)},
    "single": {"process": (add_center, add_engine), "supervisor": (add_center, add_supervisor),
               "worker": (add_worker,)},
}
