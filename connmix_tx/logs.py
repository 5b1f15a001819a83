"""The process-wide log observer: levels, line formats and destinations (docs/operations.md,
"Logging"; docs/configuration.md, ``logging``).

Every module logs through ``twisted.logger.Logger``; this room decides what reaches the output.
One :class:`LogControl` holds the current ``logging.level`` / ``logging.format`` (both hot on
SIGHUP) and the destinations: a text stream (stdout, or the file given to twistd's
``--logfile``) and, when ``logging.filename`` is set, a daily-rotated file keeping
``logging.maxFiles`` old files.  The twistd plugin hands :func:`observer_factory` to twistd's
``logger`` option so that twistd installs our observer instead of its own.

Line formats (one event per line, a failure's traceback follows on the next lines in ``text``)::

    2026-11-25 22:01:33.192724<TAB>INFO<TAB>connmix.registry<TAB>start the registry server (0.0.0.0:6786)
    {"time":"2026-11-25T22:01:33.192724+00:00","level":"info","namespace":"connmix.registry","message":"..."}
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any, Callable, cast

from twisted.application import service
from twisted.logger import ILogObserver, LoggingFile, LogLevel, formatEvent
from twisted.python.logfile import DailyLogFile
from zope.interface import implementer

LEVELS = ("debug", "info", "warn", "error")
FORMATS = ("text", "json")

_RANK = {name: rank for rank, name in enumerate(LEVELS)}
_TWISTED_RANK = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 3,  # Twisted's critical is shown as error
}
_JSON_CORE = frozenset(("time", "level", "namespace", "message", "traceback"))
# Bookkeeping keys of twisted.python.log events; they are not user fields.
_LEGACY_KEYS = frozenset(("message", "time", "system", "isError", "format", "why", "failure", "printed"))
_ROTATED_SUFFIX = re.compile(r"^(\d+)_(\d+)_(\d+)$")
#: What Twisted's listening ports log by themselves, unconditionally, through the legacy
#: ``log.msg``: ``QuietSite starting on 6789`` and ``(TCP Port 6789 Closed)`` (``TLS``, ``UNIX``
#: likewise).  Each listener already logs its own start line (``start the api server (…)``), so
#: these are dropped: one start line per listener.
_PORT_NOISE = re.compile(r"\S+ starting on \S+|\((?:\w+ )?Port \S+ Closed\)")
#: What a factory with ``noisy = True`` logs when its first connection starts and its last one
#: ends.  Ours are quiet; Twisted's HTTP client pool (``mix.http``) and the plain factories of
#: client endpoints (``mix.redis``) are not, and would log two lines per outgoing connection.
_FACTORY_NOISE = frozenset(("Starting factory {factory!r}", "Stopping factory {factory!r}"))


def _level_name(event: dict[str, Any]) -> str:
    """Our level name for an event; events without a known Twisted level count as ``info``."""
    try:
        return LEVELS[_TWISTED_RANK.get(event.get("log_level"), 1)]
    except TypeError:  # an unhashable log_level
        return "info"


def _event_time(event: dict[str, Any]) -> float:
    when = event.get("log_time")
    return time.time() if when is None else float(when)


def _traceback(event: dict[str, Any]) -> str:
    """The traceback of the event's ``log_failure``, without the trailing newline, or ``""``."""
    failure = event.get("log_failure")
    if failure is None:
        return ""
    try:
        return str(failure.getTraceback()).rstrip("\n")
    except Exception:
        return "(traceback unavailable)"


def _message(event: dict[str, Any]) -> str:
    """The formatted message; trailing newlines (legacy ``log.err`` text has one) are dropped."""
    return formatEvent(event).rstrip("\n")


def _is_legacy(event: dict[str, Any]) -> bool:
    """True for events that came from ``twisted.python.log.msg`` / ``log.err``."""
    return "isError" in event and isinstance(event.get("message"), tuple)


def is_twisted_noise(event: dict[str, Any]) -> bool:
    """True for Twisted's own ``… starting on <port>`` / ``(TCP Port <port> Closed)`` lines and
    ``Starting factory …`` / ``Stopping factory …``: the log observer drops them."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and fmt in _FACTORY_NOISE:
        return True
    if event.get("log_namespace") != "log_legacy" or event.get("isError"):
        return False
    message = event.get("message")
    return (
        isinstance(message, tuple) and len(message) == 1 and isinstance(message[0], str)
        and _PORT_NOISE.fullmatch(message[0]) is not None
    )


def format_text(event: dict[str, Any], worker: int | None = None) -> str:
    """Format an event as a tab-separated ``text`` line, without the trailing newline.

    Local time with microseconds, upper-case level, namespace, message; a failure's traceback
    follows on the next lines.  A worker process (``worker`` = its index ``i``) suffixes the
    namespace with ``.w{i}``: ``connmix.engine.w1``.
    """
    stamp = datetime.fromtimestamp(_event_time(event)).strftime("%Y-%m-%d %H:%M:%S.%f")
    namespace = str(event.get("log_namespace") or "-")
    if worker is not None:
        namespace = f"{namespace}.w{worker}"
    line = "\t".join((stamp, _level_name(event).upper(), namespace, _message(event)))
    traceback = _traceback(event)
    return f"{line}\n{traceback}" if traceback else line


def format_json(event: dict[str, Any], worker: int | None = None) -> str:
    """Format an event as one ``json`` object on one line.

    Keys: ``time`` (ISO 8601, local time with its UTC offset), ``level``, ``namespace``,
    ``message``, ``traceback`` when the event carries a failure, ``worker`` (the index) in a
    worker process, then the event's own keyword fields (keys not starting with ``log_``) that
    JSON can encode; the others are skipped, and so is a field that would overwrite one of the
    fixed keys.
    """
    when = datetime.fromtimestamp(_event_time(event), timezone.utc).astimezone()
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="microseconds"),
        "level": _level_name(event),
        "namespace": str(event.get("log_namespace") or "-"),
        "message": _message(event),
    }
    traceback = _traceback(event)
    if traceback:
        record["traceback"] = traceback
    if worker is not None:
        record["worker"] = worker
    legacy = _is_legacy(event)
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _JSON_CORE or key in record:
            continue
        if legacy and key in _LEGACY_KEYS:
            continue
        try:
            json.dumps(value, allow_nan=False)
        except Exception:
            continue
        record[key] = value
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


_FORMATTERS: dict[str, Callable[[dict[str, Any], int | None], str]] = {"text": format_text, "json": format_json}


class _DailyFile(DailyLogFile):
    """``DailyLogFile`` that reads the day from an injected clock and keeps ``max_files`` old files.

    Rotated files are named ``<file>.<year>_<month>_<day>`` (Twisted's naming).
    """

    def __init__(self, name: str, directory: str, max_files: int, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.max_files = max_files
        super().__init__(name, directory)
        self.prune()

    def toDate(self, *args: float) -> tuple[int, int, int]:
        when = args[0] if args else self._clock()
        year, month, day = time.localtime(when)[:3]
        return (year, month, day)

    def _openFile(self) -> None:
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        super()._openFile()
        if fresh:
            # A new file belongs to the clock's day, not to the file system's idea of "now".
            self.lastDate = self.toDate()

    def rotate(self) -> None:
        super().rotate()
        self.prune()

    def rotated_files(self) -> list[str]:
        """Paths of the rotated files, oldest first."""
        found: list[tuple[tuple[int, ...], str]] = []
        prefix = self.name + "."
        for entry in os.listdir(self.directory):
            if entry.startswith(prefix):
                match = _ROTATED_SUFFIX.match(entry[len(prefix):])
                if match:
                    found.append((tuple(int(part) for part in match.groups()), entry))
        return [os.path.join(self.directory, entry) for _, entry in sorted(found)]

    def prune(self) -> None:
        """Delete the oldest rotated files beyond ``max_files``."""
        old = self.rotated_files()
        for path in old[: max(0, len(old) - self.max_files)]:
            try:
                os.remove(path)
            except OSError:
                pass


@implementer(ILogObserver)
class _Observer:
    """The observer object twistd installs; it forwards every event to its :class:`LogControl`."""

    def __init__(self, control: LogControl) -> None:
        self._control = control

    def __call__(self, event: dict[str, Any]) -> None:
        self._control.emit(event)


class LogControl:
    """Holds the current level/format and the destinations; mutable at runtime (SIGHUP reload).

    :param level: minimum level written, one of :data:`LEVELS`.
    :param fmt: ``text`` or ``json``.
    :param stream: text stream for every line (default: ``sys.stdout`` as it is now, i.e. before
        twistd redirects standard output into the log).
    :param filename: when non-empty, the same lines are appended to this file, rotated daily;
        its directory is created if missing.  Opening it may raise ``OSError``.
    :param max_files: rotated files kept (``logging.maxFiles``, at least 1).
    :param clock: the time source for the rotation day (tests inject their own).
    :param worker: the index of this worker process of a multi-process engine, or None; it
        marks every line (``.w{i}`` namespace suffix in ``text``, a ``worker`` field in ``json``).
    :raises ValueError: for an unknown level or format or ``max_files < 1``.
    """

    def __init__(
        self,
        level: str = "info",
        fmt: str = "text",
        stream: IO[str] | None = None,
        filename: str = "",
        max_files: int = 7,
        clock: Callable[[], float] = time.time,
        worker: int | None = None,
    ) -> None:
        self._settings = ("info", "text")
        self.worker = worker
        self.configure(level, fmt)
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, got {max_files!r}")
        if stream is None:
            stream = sys.stdout
            if isinstance(stream, LoggingFile) and sys.__stdout__ is not None:
                stream = sys.__stdout__  # stdout already redirected into the log: avoid a loop
        self._stream: IO[str] = stream
        self._clock = clock
        self._lock = threading.RLock()
        self._local = threading.local()
        self._file: _DailyFile | None = None
        self.filename = os.path.abspath(filename) if filename else ""
        if self.filename:
            directory, name = os.path.split(self.filename)
            os.makedirs(directory, exist_ok=True)
            self._file = _DailyFile(name, directory, max_files, clock)
        self._observer = cast(ILogObserver, _Observer(self))  # zope: mypy needs the cast

    @property
    def level(self) -> str:
        """The current minimum level."""
        return self._settings[0]

    @property
    def fmt(self) -> str:
        """The current line format."""
        return self._settings[1]

    def observer(self) -> ILogObserver:
        """The one observer (always the same object) that twistd installs for the process."""
        return self._observer

    def configure(self, level: str, fmt: str) -> None:
        """Change level and format at once; takes effect for the next event.

        :raises ValueError: for an unknown level or format (the settings stay unchanged).
        """
        if level not in _RANK:
            raise ValueError(f"unknown log level {level!r}, expected one of {', '.join(LEVELS)}")
        if fmt not in _FORMATTERS:
            raise ValueError(f"unknown log format {fmt!r}, expected one of {', '.join(FORMATS)}")
        self._settings = (level, fmt)  # one assignment, so a reader never sees half a change

    def close(self) -> None:
        """Close the file destination; later lines go to the stream only."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def emit(self, event: dict[str, Any]) -> None:
        """Filter, format and write one event.  Never raises."""
        try:
            level, fmt = self._settings
            if _RANK[_level_name(event)] < _RANK[level] or is_twisted_noise(event):
                return
            if getattr(self._local, "busy", False):
                return  # a destination logged while we wrote to it: drop instead of looping
            with self._lock:
                self._local.busy = True
                try:
                    self._write(self._format(event, fmt) + "\n")
                finally:
                    self._local.busy = False
        except Exception:
            pass

    def write_line(self, line: str) -> None:
        """Write one already formatted line (a worker's, relayed by its supervisor).  Never raises."""
        try:
            with self._lock:
                self._write(line.rstrip("\n") + "\n")
        except Exception:
            pass

    def _format(self, event: dict[str, Any], fmt: str) -> str:
        try:
            return _FORMATTERS[fmt](event, self.worker)
        except Exception as exc:
            return self._fallback(event, fmt, exc)

    def _fallback(self, event: dict[str, Any], fmt: str, exc: Exception) -> str:
        """A line saying an event could not be formatted; built only from safe pieces."""
        try:
            namespace = event.get("log_namespace")
            namespace = namespace if isinstance(namespace, str) else "-"
            message = f"unable to format log event from {namespace}: {type(exc).__name__}"
        except Exception:
            message = "unable to format log event"
        event = {"log_time": self._clock(), "log_level": LogLevel.error,
                 "log_namespace": "connmix.logs", "log_format": "{text}", "text": message}
        try:
            return format_json(event) if fmt == "json" else format_text(event)
        except Exception:
            return message

    def _write(self, line: str) -> None:
        try:
            try:
                self._stream.write(line)
            except UnicodeEncodeError:
                self._stream.write(line.encode("ascii", "backslashreplace").decode("ascii"))
            self._stream.flush()
        except Exception:
            pass
        if self._file is not None:
            try:
                self._file.write(line)
                self._file.flush()
            except Exception:
                pass


class LazyLogControl:
    """A ``LogControl`` built the first time it is used, so its files open only then.

    The plugin validates the configuration before twistd prints anything, but opens no file:
    twistd calls the observer factory once it starts logging (after ``makeService``), and that
    first call builds the control with ``open_control`` (which may end the process on an
    ``OSError``).  Reloads and a supervisor's relayed lines use the same control afterwards.
    """

    def __init__(self, open_control: Callable[[], LogControl]) -> None:
        self._open = open_control
        self._control: LogControl | None = None

    @property
    def control(self) -> LogControl:
        """The control, built on first use."""
        if self._control is None:
            self._control = self._open()
        return self._control

    def observer(self) -> ILogObserver:
        """The process's observer (what twistd installs)."""
        return self.control.observer()

    def configure(self, level: str, fmt: str) -> None:
        """A new level and format (SIGHUP)."""
        self.control.configure(level, fmt)

    def write_line(self, line: str) -> None:
        """Write one already formatted line (a worker's, relayed by its supervisor)."""
        self.control.write_line(line)


class LoggingService(service.Service):
    """``logging.level`` and ``logging.format`` in the service tree: hot on SIGHUP."""

    def __init__(self, control: LogControl | LazyLogControl) -> None:
        self.setName("logging")
        self.control = control

    def reconfigure(self, old: Any, new: Any) -> None:
        """Apply the new level and format from the next event on."""
        self.control.configure(new.logging.level, new.logging.format)


_twistd_control: LogControl | LazyLogControl | None = None


def twistd_observer() -> ILogObserver:
    """Return the observer of the control given to the latest :func:`observer_factory` call.

    This is the object twistd's ``logger`` option names (see :func:`observer_factory`).
    """
    if _twistd_control is None:
        raise RuntimeError("connmix_tx.logs.observer_factory() was not called")
    return _twistd_control.observer()


class _ObserverFactory(str):
    """A zero-argument observer factory that is also the dotted name of :func:`twistd_observer`.

    twistd's ``ServerOptions.postOptions`` runs after the plugin's own ``postOptions`` and passes
    the ``logger`` option through ``namedAny``, which needs a dotted name: being a ``str`` lets
    the factory survive that step, and being callable keeps it usable directly.
    """

    control: LogControl | LazyLogControl

    def __new__(cls, control: LogControl | LazyLogControl) -> _ObserverFactory:
        factory = super().__new__(cls, f"{__name__}.twistd_observer")
        factory.control = control
        return factory

    def __call__(self) -> ILogObserver:
        return self.control.observer()


def observer_factory(control: LogControl | LazyLogControl) -> Callable[[], ILogObserver]:
    """What the plugin's ``postOptions`` puts in the parent twistd option ``logger``.

    Calling the result returns ``control.observer()``; twistd resolves it by name to
    :func:`twistd_observer`, which returns the same observer.
    """
    global _twistd_control
    _twistd_control = control
    return _ObserverFactory(control)
