"""``twistd connmix``: command-line options and the service maker (SPEC 2).

Wiring only.  ``Options.postOptions`` validates the flags, loads the configuration (one line and
exit 2 on error, no usage text), installs our log observer in place of twistd's, and prints the
banner; ``makeService`` builds the service tree for the role and gives it the SIGHUP reloader.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from twisted.python import usage

from connmix_tx import __version__

ROLE_CHOICES = ("center", "engine", "single")


def lua_version() -> str:
    """``jit.version`` read from a fresh LuaJIT runtime, e.g. ``LuaJIT 2.1.1774896198``."""
    from lupa import luajit21

    runtime = luajit21.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    return runtime.eval("jit.version").decode()


def version_line() -> str:
    """The version line of SPEC 2.3."""
    import twisted

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
    """``twistd connmix [--dev | --role ROLE] [-f FILE] [--version]``."""

    synopsis = "[--dev | --role center|engine|single] [-f FILE]"
    optFlags = [["dev", None, "Run center and engine in one process (development)."]]
    optParameters = [
        ["role", None, None, "Run this role: center, engine or single."],
        ["config", "f", None, "YAML configuration file (default: <home>/etc/connmix.yaml)."],
    ]

    def opt_version(self) -> None:
        """Print the version line and exit."""
        print(version_line())
        raise SystemExit(0)

    def postOptions(self) -> None:
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
        self._load_config()
        self._install_logging()
        print(LOGO)
        print(version_line())
        sys.stdout.flush()

    def _load_config(self) -> None:
        from connmix_tx.config import ConfigError, load_config
        from connmix_tx.service import EXIT_CONFIG, write_fatal_line

        try:
            self.config = load_config(self["config"], role=self["role"])
        except ConfigError as e:
            write_fatal_line(str(e))
            raise SystemExit(EXIT_CONFIG) from None

    def _install_logging(self) -> None:
        from connmix_tx.logs import LogControl, observer_factory

        parent: Any = getattr(self, "parent", None)
        stream = None
        logfile = parent.get("logfile") if parent is not None else None
        if logfile and logfile != "-":
            stream = open(logfile, "a", encoding="utf-8")
        logging = self.config.logging
        try:
            self.log_control = LogControl(
                level=logging.level, fmt=logging.format, stream=stream,
                filename=logging.filename, max_files=logging.max_files,
            )
        except OSError as e:
            from connmix_tx.service import EXIT_CONFIG, write_fatal_line

            write_fatal_line(f"config logging.filename: cannot open {logging.filename}: {e.strerror}")
            raise SystemExit(EXIT_CONFIG) from None
        if parent is not None:
            parent["logger"] = observer_factory(self.log_control)


def makeService(options: Options) -> Any:
    """Build the service tree of the role given on the command line."""
    from twisted.internet import reactor
    from twisted.logger import Logger

    from connmix_tx.service import ConnmixService, Fatal, FatalError, write_fatal_line
    from connmix_tx.reload import Reloader

    log = Logger(namespace="connmix.config")
    config = options.config
    if options["role"] == "dev":
        log.warn("dev mode: center and engine run in one process")
    for key in config.unused_keys:
        log.warn("config key {path} is not used by connmix-tx", path=key)
    try:
        root = ConnmixService(config, options["role"], reactor, Fatal(reactor))
    except FatalError as e:
        write_fatal_line(e.message)
        raise SystemExit(e.code) from None
    root.reloader = Reloader(root, getattr(options, "log_control", None))
    reactor.callWhenRunning(root.install_signal_handlers, reactor)
    return root
