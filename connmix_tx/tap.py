"""``twistd connmix``: command-line options and the service maker (docs/operations.md).

Wiring only.  ``Options.postOptions`` validates the flags and loads the configuration (one line
and exit 2 on error, no usage text, before twistd prints anything) and names our log observer in
twistd's ``logger`` option (its files open when twistd starts logging); it prints nothing.
``makeService`` prints the banner, builds the service tree of the role and adds the ``logging``
and ``signals`` services (SIGHUP runs ``connmix_tx.reload.Reloader``).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from twisted.python import usage

from connmix_tx import __version__

ROLE_CHOICES = ("center", "engine", "single")


def version_line() -> str:
    """The version line (``--version``, and under the banner)."""
    import twisted

    from connmix_tx.lua.runtime import lua_version

    python = ".".join(str(p) for p in sys.version_info[:3])
    return (
        f"connmix-tx {__version__}, python{python}, twisted{twisted.__version__}, "
        f"{lua_version()}+bit, {sys.platform}, {platform.machine()}"
    )


LOGO = r"""
                                       _
   ___ ___  _ __  _ __  _ __ ___ (_)_  __     | |___  __
  / __/ _ \| '_ \| '_ \| '_ ` _ \| \ \/ /_____| __\ \/ /
 | (_| (_) | | | | | | | | | | | | |>  <_____| |_ >  <
  \___\___/|_| |_|_| |_|_| |_| |_|_/_/\_\     \__/_/\_\
"""


class Options(usage.Options):
    """``twistd connmix [--dev | --role ROLE] [-f FILE] [-p N] [--version]``.

    ``--worker-of``, ``--worker``, ``--center-registry`` and ``--worker-dir`` are internal: a
    supervisor starts its worker processes with them (docs/workers.md).
    """

    synopsis = "[--dev | --role center|engine|single] [-f FILE] [-p N]"
    optFlags = [["dev", None, "Run center and engine in one process (development)."]]
    optParameters = [
        ["role", None, None, "Run this role: center, engine or single."],
        ["config", "f", None, "YAML configuration file (default: <home>/etc/connmix.yaml)."],
        ["processes", "p", None,
         "Engine worker processes (overrides engine.workers); 0 = one per CPU."],
        ["worker-of", None, None, "Internal: run as a worker process of this engine id."],
        ["worker", None, None, "Internal: the index of this worker process."],
        ["center-registry", None, None, "Internal: host:port of the supervisor's registry."],
        ["worker-dir", None, None, "Internal: the engine's run directory."],
    ]

    #: The ``-p`` value (None: ``engine.workers`` decides); set by ``postOptions``.
    processes: int | None = None
    #: Set when this process is a worker started by a supervisor.
    worker_role: Any = None

    def getUsage(self, width: int | None = None) -> str:
        """The usage text without the internal worker options."""
        text = super().getUsage(width)
        return "\n".join(line for line in text.splitlines() if "Internal: " not in line) + "\n"

    def opt_version(self) -> None:
        """Print the version line and exit."""
        print(version_line())
        raise SystemExit(0)

    def postOptions(self) -> None:
        """Validate the flags and the configuration; choose our log observer.  Prints nothing."""
        role = self["role"]
        if role == "dev":
            self["dev"], role = True, None
        if self["dev"] and role is not None:
            raise usage.UsageError("give either --dev or --role, not both")
        if not self["dev"] and role is None:
            raise usage.UsageError("one of --dev or --role center|engine|single is required")
        if role is not None and role not in ROLE_CHOICES:
            raise usage.UsageError(f"--role must be one of {', '.join(ROLE_CHOICES)}")
        self["role"] = "dev" if self["dev"] else role
        self._worker_options()
        self._load_config()
        self._choose_logging()

    def _worker_options(self) -> None:
        from connmix_tx.config import MAX_WORKERS
        from connmix_tx.workers import WorkerRole

        text = self["processes"]
        if text is not None:
            try:
                self.processes = int(text)
            except ValueError:
                self.processes = -1
            if not 0 <= self.processes <= MAX_WORKERS:
                raise usage.UsageError(f"-p/--processes must be an integer 0-{MAX_WORKERS}, got {text!r}")
        if self["worker-of"] is None:
            return
        try:
            index = int(self["worker"])
            center = None
            if self["center-registry"]:
                host, _, port = self["center-registry"].rpartition(":")
                center = (host, int(port))
        except (TypeError, ValueError):
            raise usage.UsageError("--worker-of needs --worker N (and --center-registry host:port)") from None
        self.worker_role = WorkerRole(self["worker-of"], index, center, self["worker-dir"], self["role"])

    def _load_config(self) -> None:
        from connmix_tx.config import ConfigError, load_config
        from connmix_tx.errors import EXIT_CONFIG, write_fatal_line

        try:
            self.config = load_config(self["config"], role=self["role"], workers=self.processes)
        except ConfigError as e:
            write_fatal_line(str(e))
            raise SystemExit(EXIT_CONFIG) from None

    def _choose_logging(self) -> None:
        """Set twistd's ``logger`` option to our observer; its files open when twistd asks for it."""
        from connmix_tx.logs import LazyLogControl, observer_factory

        parent: Any = getattr(self, "parent", None)
        logfile = parent.get("logfile") if parent is not None else None
        self.log_control = LazyLogControl(lambda: _open_logging(self.config.logging, logfile, self.worker_role))
        if parent is not None:
            parent["logger"] = observer_factory(self.log_control)


def _open_logging(logging: Any, logfile: str | None, worker: Any) -> Any:
    """The process's ``LogControl``: the twistd log file and ``logging.filename`` opened (exit 2)."""
    from connmix_tx.errors import EXIT_CONFIG, write_fatal_line
    from connmix_tx.logs import LogControl

    stream = None
    if logfile and logfile != "-" and worker is None:
        try:
            stream = open(logfile, "a", encoding="utf-8")
        except OSError as e:
            write_fatal_line(f"--logfile: cannot open {logfile}: {e.strerror}")
            raise SystemExit(EXIT_CONFIG) from None
    try:
        # A worker writes its lines to its stdout only: the supervisor relays them into its
        # own destinations (stream and logging.filename).
        return LogControl(
            level=logging.level, fmt=logging.format, stream=stream,
            filename=logging.filename if worker is None else "", max_files=logging.max_files,
            worker=worker.index if worker is not None else None,
        )
    except OSError as e:
        write_fatal_line(f"config logging.filename: cannot open {logging.filename}: {e.strerror}")
        raise SystemExit(EXIT_CONFIG) from None


def print_banner() -> None:
    """The logo and the version line, before the first log line."""
    print(LOGO)
    print(version_line())
    sys.stdout.flush()


def makeService(options: Options) -> Any:
    """Build the service tree of the role given on the command line; print the banner first."""
    from twisted.logger import Logger

    from connmix_tx.config import device_cpus, worker_count
    from connmix_tx.errors import Fatal, FatalError, exit_with
    from connmix_tx.logs import LoggingService
    from connmix_tx.reactors import global_reactor
    from connmix_tx.reload import Reloader
    from connmix_tx.service import ConnmixService
    from connmix_tx.signals import SignalHandlers

    reactor = global_reactor()
    log = Logger(namespace="connmix.config")
    config = options.config
    worker = options.worker_role
    role = options["role"]
    if worker is None:  # a worker's supervisor printed the banner and logged these
        print_banner()
        processes = options.processes
        workers = worker_count(config.engine.workers if processes is None else processes)
        cpus = device_cpus()
        if role in ("dev", "single") and workers < cpus:
            Logger(namespace="connmix.engine").warn(
                "cpu underutilized, max_procs: {max_procs}, device_cpus: {device_cpus}",
                max_procs=workers, device_cpus=cpus,
            )
        if role == "dev":
            log.warn("dev mode: center and engine run in one process")
        for key in config.unused_keys:
            log.warn("config key {path} is not used by connmix-tx", path=key)
    log_control = getattr(options, "log_control", None)
    relay = log_control.write_line if log_control is not None else None
    try:
        root = ConnmixService(config, role, reactor, Fatal(reactor), processes=options.processes,
                              worker=worker, relay=relay)
    except FatalError as e:
        raise exit_with(e) from None
    if log_control is not None:
        LoggingService(log_control).setServiceParent(root)
    reloader = Reloader(root, workers=options.processes)
    SignalHandlers(reactor, reloader.reload, ignore_interrupt=worker is not None).setServiceParent(root)
    reactor.callWhenRunning(freeze_startup_objects)
    return root


def freeze_startup_objects() -> None:
    """Take what start-up built out of the cyclic collector's way (``gc.freeze``).

    It lives as long as the process (modules, the service tree, the Lua runtime); under load the
    collector's full passes then walk only what was made since: the objects of waiting Lua
    callbacks and in-flight mesh operations (docs/performance.md, "The mesh fast path").
    """
    import gc

    gc.collect()
    gc.freeze()
