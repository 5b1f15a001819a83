"""Hot reload of a server's Lua files (docs/lua-api.md, "Hot reload").

``HotReloader`` polls, every ``byteCodeExpires`` seconds, the modification time and size of the
entry and of every module the current generation loaded from the entry folder
(``Script.files``).  When one changed it compiles the entry into a fresh environment; success
switches the script to the new generation for callbacks started from then on (running and
suspended ones finish with the code they started with), failure keeps the old one and logs the
error with file:line.  A broken version is remembered by its file stamps and not compiled again
until the files change once more.  The poll runs on an injected clock.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from connmix_tx.lua.runtime import Script, ScriptError
from connmix_tx.meter import NULL_METER, ReloadMeter

log = Logger(namespace="connmix.lua")

#: path -> (mtime, size), or None for a file that cannot be read any more.
Stamps = dict[str, "tuple[float, int] | None"]


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime, st.st_size


class HotReloader:
    """Reloads one server's script when its files change; ``interval`` 0 = off."""

    def __init__(self, script: Script, clock: IReactorTime, interval: float, meter: ReloadMeter = NULL_METER) -> None:
        self.meter = meter
        self.script = script
        self.clock = clock
        self.interval = interval
        self.entry = script.chunk_name(script.entry)
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self._failed: Stamps | None = None
        self._started = False

    def start(self) -> None:
        """Start polling (if the interval is not 0)."""
        self._started = True
        self._schedule()

    def stop(self) -> None:
        """Stop polling."""
        self._started = False
        if self._loop.running:
            self._loop.stop()

    def set_interval(self, seconds: float) -> None:
        """A new ``byteCodeExpires`` (SIGHUP): restart the timer with it; 0 turns polling off."""
        self.interval = seconds
        if self._loop.running:
            self._loop.stop()
        if self._started:
            self._schedule()

    def _schedule(self) -> None:
        if self.interval > 0 and not self._loop.running:
            self._loop.start(self.interval, now=False)

    def check(self) -> bool:
        """Compare the file stamps, recompile on a change; True when a new version is in use."""
        loaded = self.script.files
        now: Stamps = {path: _stamp(path) for path in loaded}
        if now == loaded or now == self._failed:
            return False
        try:
            generation = self.script.compile()
        except ScriptError as e:
            self._failed = now
            log.error("lua reload failed {entry}: {error}", entry=self.entry, error=str(e))
            self.meter.reloaded(self.entry, ok=False)
            return False
        except Exception:
            # Not the script's fault; keep polling (a LoopingCall that raises stops for good).
            self._failed = now
            log.failure("lua reload failed {entry}", entry=self.entry)
            self.meter.reloaded(self.entry, ok=False)
            return False
        self._failed = None
        self.script.use(generation)
        log.info("lua reloaded {entry}", entry=self.entry)
        self.meter.reloaded(self.entry, ok=True)
        return True
