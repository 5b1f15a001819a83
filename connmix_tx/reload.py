"""SIGHUP: read the configuration file again and apply what can change at run time.

``Reloader.reload`` reads and validates the file given at start (``config.source``).  A file that
does not validate is refused with ``config reload failed: <problem>`` and nothing changes.
Otherwise every changed restart-only key keeps its old value and is logged
(``config reload: {key path} changed, restart required``, in the new log format), and the
effective configuration is handed to the service tree: ``reconfigure_tree`` calls
``reconfigure(old, new)`` on every service that has one (``connmix_tx.tree``), and each applies
its own hot keys (docs/configuration.md lists them):

* the root: ``access`` (the next request and handshake);
* ``logging``: level and format, from the next event on;
* the engine part: the "new conns" keys of ``engine.apiServer``; API WebSockets of removed users
  are closed with 4001;
* ``queues``: ``engine.luavm.queue`` sizes (nothing waiting is dropped);
* each ``servers[i]``: ``engine.luavm.maxInstructions``, ``byteCodeExpires``, ``options`` (what
  ``mix.server.option`` reads) and the "new conns" keys of its factory;
* a supervisor's ``workers``: SIGHUP forwarded to every worker process.

Then ``config reloaded`` is logged.  Reloads run on the reactor thread, so they never overlap; a
SIGHUP arriving during one is applied after it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from twisted.logger import Logger

from connmix_tx.config import Config, ConfigError, load_config, reload_diff
from connmix_tx.tree import reconfigure_tree

log = Logger(namespace="connmix.config")

_STEP = re.compile(r"([A-Za-z]+)(?:\[(\d+)\])?")


def _attr(key: str) -> str:
    """The config object attribute of a YAML key (``maxWriteBuffer`` -> ``max_write_buffer``)."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()


def _restore(new: Any, old: Any, steps: list[str]) -> Any:
    """``new`` with the value at the key path ``steps`` taken from ``old``."""
    if not steps:
        return old
    match = _STEP.fullmatch(steps[0])
    if match is None:
        raise ValueError(f"bad key path step {steps[0]!r}")
    name, index = _attr(match.group(1)), match.group(2)
    new_value, old_value = getattr(new, name), getattr(old, name)
    if index is None:
        value = _restore(new_value, old_value, steps[1:])
    else:
        i = int(index)
        items = list(new_value)
        items[i] = _restore(new_value[i], old_value[i], steps[1:])
        value = tuple(items)
    return dataclasses.replace(new, **{name: value})


def effective_config(old: Config, new: Config, cold: list[str]) -> Config:
    """``new`` with every restart-only key of ``cold`` (paths from ``reload_diff``) kept as in ``old``."""
    result = new
    for path in cold:
        result = _restore(result, old, path.split("."))
    return dataclasses.replace(result, source=old.source, unused_keys=new.unused_keys)


class Reloader:
    """Applies SIGHUP reloads to a running service tree.

    :param root: the ``ConnmixService``; its ``config`` is the running configuration.
    :param cwd: where a relative configuration path is taken from (tests).
    :param workers: the ``-p`` value, so the file is validated as it was at start.
    """

    def __init__(self, root: Any, cwd: str | None = None, workers: int | None = None) -> None:
        self.root = root
        self.cwd = cwd
        self.workers = workers
        self._running = False
        self._again = False

    def reload(self) -> None:
        """Reload now; called again during a reload, it runs once more after this one."""
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._reload_once()
        finally:
            self._running = False

    def _reload_once(self) -> None:
        old: Config = self.root.config
        try:
            new = load_config(old.source, role=self.root.role, cwd=self.cwd, workers=self.workers)
        except ConfigError as e:
            log.error("config reload failed: {error}", error=str(e))
            return
        _, cold = reload_diff(old, new)
        config = effective_config(old, new, cold)
        try:
            self.apply(old, config)
        except Exception:
            log.failure("config reload: applying the new configuration failed")
            return
        for path in cold:  # after the new logging settings, so these lines use them
            log.warn("config reload: {path} changed, restart required", path=path)
        log.info("config reloaded")

    def apply(self, old: Config, config: Config) -> None:
        """Make ``config`` (hot keys changed, restart-only keys as running) the running one.

        Every service of the tree with a ``reconfigure(old, new)`` applies its own keys.
        """
        reconfigure_tree(self.root, old, config)
