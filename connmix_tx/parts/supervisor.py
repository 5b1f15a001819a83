"""The parts of a multi-process engine (docs/workers.md): the supervisor's and a worker's.

A supervisor runs ``workers`` (``WorkerPool``) in place of the engine part: it starts, restarts
and stops the worker processes and forwards SIGHUP to them once the reload validated the file.
A worker runs the engine part on the ports it shares with its siblings, plus ``parent-watch``
(``ParentWatch``), which stops it when its supervisor is gone.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from connmix_tx.config import Config
from connmix_tx.errors import stop_reactor
from connmix_tx.ids import new_node_id
from connmix_tx.parts.engine import EnginePart
from connmix_tx.reactors import IReactor
from connmix_tx.workers import ParentWatch, WorkerPool, report_ready, worker_argv

if TYPE_CHECKING:
    from connmix_tx.service import ConnmixService

def add_worker(root: ConnmixService, config: Config, reactor: IReactor, fatal: Callable[[int, str], None]) -> None:
    """Worker ``i`` of a multi-process engine: the engine part, and a watch on its supervisor."""
    worker = root.worker
    assert worker is not None
    target = worker.center or (config.engine.center_registry.host, config.engine.center_registry.port)
    root.engine = EnginePart(
        config, reactor, fatal, lambda: target, in_process_center=False, access=root.access, worker=worker
    )
    root.engine.on_ready = report_ready
    root.engine.setServiceParent(root)

    def supervisor_gone() -> None:
        # Nobody else will remove the engine's run directory: the last worker out does.
        if worker.directory:
            reactor.addSystemEventTrigger("after", "shutdown", _remove_empty_directory, worker.directory)
        reactor.callLater(0, stop_reactor, reactor)

    watch = ParentWatch(reactor, supervisor_gone)
    watch.setName("parent-watch")
    watch.setServiceParent(root)


def _remove_empty_directory(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # a sibling still has its socket there; it will try too


def add_supervisor(root: ConnmixService, config: Config, reactor: IReactor, fatal: Callable[[int, str], None]) -> None:
    """The supervisor's worker processes; in dev / single they dial the in-process registry."""
    engine_id = new_node_id()
    center = root.center
    source = config.source or ""

    def argv(index: int) -> list[str]:
        address = ("127.0.0.1", center.registry_listener.actual_port) if center is not None else None
        directory = root.workers.directory if root.workers is not None else None
        return worker_argv(root.role, source, engine_id, index, address, directory, root.worker_count)

    root.workers = WorkerPool(root.worker_count, argv, reactor, fatal, root.relay)
    root.workers.engine_id = engine_id
    root.workers.setServiceParent(root)
