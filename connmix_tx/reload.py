"""SIGHUP: read the configuration file again and apply what can change at run time (SPEC 3.4).

``Reloader.reload`` reads and validates the file given at start (``config.source``).  A file that
does not validate is refused with ``config reload failed: <problem>`` and nothing changes.
Otherwise the hot keys are applied, and every changed restart-only key keeps its old value and is
logged (``config reload: {key path} changed, restart required``, in the new log format):

* ``logging.level`` / ``logging.format``: ``LogControl.configure``, from the next event on;
* ``access``: ``AccessControl.replace`` for the next request and handshake; open API WebSockets
  of a user that no longer exists are closed with 4001;
* ``engine.luavm.queue``: ``QueueManager.configure`` (nothing waiting is dropped);
* ``engine.luavm.maxInstructions``: ``Script.set_instruction_limit``, from the next run-slice;
* ``servers[].byteCodeExpires``: ``set_interval`` of the server's Lua hot reloader, if it has one;
* the "new conns" keys of ``engine.apiServer`` and ``engine.servers[]``: the factories'
  ``reconfigure``, for connections accepted from then on (``options`` are also what
  ``mix.server.option`` reads from then on).

Then ``config reloaded`` is logged.  Reloads run on the reactor thread, so they never overlap; a
SIGHUP arriving during one is applied after it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from twisted.logger import Logger

from connmix_tx.config import Config, ConfigError, load_config, reload_diff

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
    :param log_control: the process's ``LogControl`` (None when logging is not ours: tests).
    """

    def __init__(self, root: Any, log_control: Any = None, cwd: str | None = None) -> None:
        self.root = root
        self.log_control = log_control
        self.cwd = cwd
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
            # The mesh port range is checked for the workers that run (``-p`` wins over the file).
            new = load_config(old.source, role=self.root.role, cwd=self.cwd,
                              workers=getattr(self.root, "worker_count", None))
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
        """Make ``config`` (hot keys changed, restart-only keys as running) the running one."""
        root = self.root
        root.config = config
        if self.log_control is not None:
            self.log_control.configure(config.logging.level, config.logging.format)
        if config.access != old.access:
            root.access.replace(config.access)
            if root.engine is not None:
                root.engine.api_factory.users_replaced()
        if root.engine is not None:
            self._apply_engine(root.engine, old, config)

    def _apply_engine(self, engine: Any, old: Config, config: Config) -> None:
        luavm = config.engine.luavm
        engine.config = config
        engine.queues.configure(luavm.queue.topic_size, luavm.queue.max_topics, luavm.queue.ack_timeout)
        if luavm.max_instructions != old.engine.luavm.max_instructions:
            for script in engine.scripts:
                script.set_instruction_limit(luavm.max_instructions)
        if config.engine.api_server != old.engine.api_server:
            engine.api_factory.reconfigure(config.engine.api_server)
        reloaders = getattr(engine, "reloaders", None) or []
        for index, server in enumerate(config.engine.servers):
            before = old.engine.servers[index]
            if server == before:
                continue
            if server.byte_code_expires != before.byte_code_expires and index < len(reloaders):
                setter = getattr(reloaders[index], "set_interval", None)
                if setter is not None:
                    setter(server.byte_code_expires)
            if server.options != before.options and index < len(engine.libraries):
                options = engine.libraries[index].options
                options.clear()
                options.update(server.options)
            if index < len(engine.client_factories):
                engine.client_factories[index].reconfigure(server)
