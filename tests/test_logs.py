"""Tests for connmix_tx.logs: line formats, level filter, hot reconfiguration, file rotation."""

from __future__ import annotations

import io
import json
import os
import time
from datetime import datetime
from typing import Any, Iterator

import pytest
from twisted.application.app import AppLogger, ServerOptions
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from connmix_tx import logs
from connmix_tx.logs import LogControl, format_json, format_text, observer_factory

T0 = 1795644093.192724  # 2026-11-25 22:01:33.192724 UTC


def local_stamp(when: float) -> str:
    return datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S.%f")


def make(level: str = "info", fmt: str = "text", **kwargs: Any) -> tuple[LogControl, io.StringIO, Logger]:
    stream = io.StringIO()
    control = LogControl(level=level, fmt=fmt, stream=stream, **kwargs)
    publisher = LogPublisher(pin_time, control.observer())
    return control, stream, Logger(namespace="connmix.registry", observer=publisher)


def pin_time(event: dict[str, Any]) -> None:
    """First observer on the publisher: Logger.emit stamps time(); replace it with T0."""
    event["log_time"] = T0


def emit(logger: Logger, level: LogLevel, fmt: str, **fields: Any) -> None:
    logger.emit(level, fmt, **fields)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- formats -----------------------------------------------------------------------------------


def test_text_line_exact() -> None:
    _, stream, log = make()
    emit(log, LogLevel.info, "start the registry server ({bind}:{port})", bind="0.0.0.0", port=6786)
    assert stream.getvalue() == (
        f"{local_stamp(T0)}\tINFO\tconnmix.registry\tstart the registry server (0.0.0.0:6786)\n"
    )


def test_spec_examples_in_utc(utc: None) -> None:
    _, stream, log = make()
    emit(log, LogLevel.info, "start the registry server ({bind}:{port})", bind="0.0.0.0", port=6786)
    assert stream.getvalue() == (
        "2026-11-25 22:01:33.192724\tINFO\tconnmix.registry\tstart the registry server (0.0.0.0:6786)\n"
    )
    event = {"log_time": T0, "log_level": LogLevel.info, "log_namespace": "connmix.registry",
             "log_format": "hello"}
    assert format_json(event) == (
        '{"time":"2026-11-25T22:01:33.192724+00:00","level":"info",'
        '"namespace":"connmix.registry","message":"hello"}'
    )


def test_json_line() -> None:
    _, stream, log = make(fmt="json")
    emit(log, LogLevel.info, "start the registry server ({bind}:{port})", bind="0.0.0.0", port=6786)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text)
    assert list(record)[:4] == ["time", "level", "namespace", "message"]
    assert datetime.fromisoformat(record["time"]).timestamp() == pytest.approx(T0, abs=1e-6)
    assert record["time"].endswith(datetime.fromtimestamp(T0).astimezone().isoformat()[-6:])
    assert ".192724" in record["time"]
    assert {k: v for k, v in record.items() if k != "time"} == {
        "level": "info",
        "namespace": "connmix.registry",
        "message": "start the registry server (0.0.0.0:6786)",
        "bind": "0.0.0.0",
        "port": 6786,
    }


def test_json_skips_unencodable_fields() -> None:
    _, stream, log = make(fmt="json")
    circular: list[Any] = []
    circular.append(circular)
    emit(log, LogLevel.warn, "peer {peer} slow", peer="10.0.0.1", obj=object(), nan=float("nan"),
         nested={"a": [1, 2]}, circular=circular)
    record = json.loads(stream.getvalue())
    assert record["level"] == "warn"
    assert record["peer"] == "10.0.0.1"
    assert record["nested"] == {"a": [1, 2]}
    assert "obj" not in record and "nan" not in record and "circular" not in record
    assert not any(key.startswith("log_") for key in record)


def test_json_fields_never_overwrite_core_keys() -> None:
    event = {"log_time": T0, "log_level": LogLevel.info, "log_namespace": "connmix.api",
             "log_format": "{message}", "message": "hi", "level": "nope", "time": 1}
    record = json.loads(format_json(event))
    assert record["message"] == "hi" and record["level"] == "info"
    assert isinstance(record["time"], str)


def test_critical_is_error() -> None:
    _, stream, log = make()
    emit(log, LogLevel.critical, "disk on fire")
    assert stream.getvalue().split("\t")[1] == "ERROR"
    event = {"log_time": T0, "log_level": LogLevel.critical, "log_namespace": "x", "log_format": "y"}
    assert json.loads(format_json(event))["level"] == "error"


def test_failure_traceback_text_and_json() -> None:
    control, stream, log = make()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("callback {name} failed", name="on_message")
    lines = stream.getvalue().rstrip("\n").split("\n")
    assert lines[0] == f"{local_stamp(T0)}\tERROR\tconnmix.registry\tcallback on_message failed"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1].endswith("ZeroDivisionError: division by zero")

    control.configure("info", "json")
    stream.seek(0)
    stream.truncate()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("callback {name} failed", name="on_message")
    text = stream.getvalue()
    assert text.count("\n") == 1
    record = json.loads(text)
    assert record["level"] == "error"
    assert record["message"] == "callback on_message failed"
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert record["traceback"].endswith("ZeroDivisionError: division by zero")


def test_legacy_events() -> None:
    stream = io.StringIO()
    control = LogControl(stream=stream)
    publisher = LogPublisher(control.observer())
    legacy = legacy_log.LogPublisher(observerPublisher=publisher, publishPublisher=publisher)
    legacy.msg("plain old message")
    try:
        1 / 0
    except ZeroDivisionError:  # what twisted.python.log.err() sends
        legacy.msg(failure=Failure(), why="legacy trouble", isError=1)
    lines = stream.getvalue().split("\n")
    first = lines[0].split("\t")
    assert first[1:] == ["INFO", "log_legacy", "plain old message"]
    datetime.strptime(first[0], "%Y-%m-%d %H:%M:%S.%f")
    assert lines[1].split("\t")[1:] == ["ERROR", "log_legacy", "legacy trouble"]
    assert "ZeroDivisionError: division by zero" in stream.getvalue()
    assert "" not in stream.getvalue().rstrip("\n").split("\n")  # no blank line after the traceback

    control.configure("info", "json")
    stream.seek(0)
    stream.truncate()
    legacy.msg("json too", system="foo", custom=5)
    record = json.loads(stream.getvalue())
    assert record["level"] == "info" and record["message"] == "json too"
    assert record["custom"] == 5
    assert "isError" not in record and "system" not in record


# --- filtering and hot changes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["DEBUG", "INFO", "WARN", "ERROR", "ERROR"]),
        ("info", ["INFO", "WARN", "ERROR", "ERROR"]),
        ("warn", ["WARN", "ERROR", "ERROR"]),
        ("error", ["ERROR", "ERROR"]),
    ],
)
def test_level_filter(level: str, expected: list[str]) -> None:
    _, stream, log = make(level=level)
    for twisted_level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
        emit(log, twisted_level, "x")
    assert [line.split("\t")[1] for line in stream.getvalue().splitlines()] == expected


def test_hot_configure_level_and_format() -> None:
    control, stream, log = make(level="info", fmt="text")
    emit(log, LogLevel.debug, "hidden")
    emit(log, LogLevel.info, "first")
    control.configure("debug", "json")
    assert (control.level, control.fmt) == ("debug", "json")
    emit(log, LogLevel.debug, "second")
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"{local_stamp(T0)}\tINFO\tconnmix.registry\tfirst"
    assert json.loads(lines[1])["message"] == "second"
    assert json.loads(lines[1])["level"] == "debug"
    assert len(lines) == 2


def test_configure_rejects_unknown_values() -> None:
    control, _, _ = make()
    with pytest.raises(ValueError):
        control.configure("verbose", "text")
    with pytest.raises(ValueError):
        control.configure("info", "xml")
    assert (control.level, control.fmt) == ("info", "text")
    with pytest.raises(ValueError):
        LogControl(max_files=0, stream=io.StringIO())


# --- robustness --------------------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    __repr__ = __str__


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_formatting_failure_writes_fallback_line(fmt: str) -> None:
    control, stream, _ = make(fmt=fmt)
    observer = control.observer()
    observer({"log_time": T0, "log_level": LogLevel.info, "log_namespace": Unprintable(), "log_format": "x"})
    observer({"log_time": 1e300, "log_level": LogLevel.info, "log_namespace": "connmix.api", "log_format": "x"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert [r["namespace"] for r in records] == ["connmix.logs", "connmix.logs"]
        assert records[1]["message"].startswith("unable to format log event from connmix.api")
    else:
        assert all(line.split("\t")[1:3] == ["ERROR", "connmix.logs"] for line in lines)
        assert "unable to format log event" in lines[0]


def test_unformattable_message_still_written() -> None:
    _, stream, log = make()
    emit(log, LogLevel.info, "value {missing}")
    line = stream.getvalue()
    assert line.count("\n") == 1 and "\tINFO\tconnmix.registry\t" in line


def test_broken_stream_does_not_raise_and_file_still_written(tmp_path: Any) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("broken pipe")

    control = LogControl(stream=Broken(), filename=str(tmp_path / "c.log"))
    observer = control.observer()
    observer({"log_time": T0, "log_level": LogLevel.info, "log_namespace": "n", "log_format": "ok"})
    control.close()
    assert (tmp_path / "c.log").read_text().endswith("\tINFO\tn\tok\n")


def test_reentrant_stream_does_not_loop() -> None:
    class Echo(io.StringIO):
        observer: Any = None

        def write(self, s: str) -> int:
            self.observer({"log_level": LogLevel.info, "log_namespace": "stdout", "log_format": "echo"})
            return super().write(s)

    stream = Echo()
    control = LogControl(stream=stream)
    stream.observer = control.observer()
    stream.observer({"log_time": T0, "log_level": LogLevel.info, "log_namespace": "n", "log_format": "m"})
    assert stream.getvalue().splitlines() == [f"{local_stamp(T0)}\tINFO\tn\tm"]


# --- file destination ------------------------------------------------------------------------------------


def test_file_destination_same_lines_once(tmp_path: Any) -> None:
    path = tmp_path / "logs" / "sub" / "connmix.log"
    clock = Clock(datetime(2026, 11, 25, 12, 0).timestamp())
    control, stream, log = make(filename=str(path), clock=clock)
    assert control.filename == str(path)
    emit(log, LogLevel.info, "one")
    emit(log, LogLevel.debug, "dropped")
    emit(log, LogLevel.warn, "two")
    assert path.read_text() == stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 2
    control.close()
    emit(log, LogLevel.info, "after close")
    assert len(path.read_text().splitlines()) == 2
    assert len(stream.getvalue().splitlines()) == 3


def test_daily_rotation_and_pruning(tmp_path: Any) -> None:
    path = tmp_path / "connmix.log"
    day0 = datetime(2026, 11, 20, 12, 0)
    clock = Clock(day0.timestamp())
    control, _, log = make(filename=str(path), max_files=2, clock=clock)
    emit(log, LogLevel.info, "day 20")
    emit(log, LogLevel.info, "day 20 again")
    assert sorted(os.listdir(tmp_path)) == ["connmix.log"]

    for day in (21, 22, 23, 24):
        clock.now = datetime(2026, 11, day, 0, 0, 1).timestamp()
        emit(log, LogLevel.info, f"day {day}")

    assert sorted(os.listdir(tmp_path)) == ["connmix.log", "connmix.log.2026_11_22", "connmix.log.2026_11_23"]
    assert path.read_text().splitlines()[0].endswith("\tday 24")
    assert (tmp_path / "connmix.log.2026_11_23").read_text().splitlines()[0].endswith("\tday 23")
    control.close()

    # A restart prunes leftovers beyond max_files.
    for stale in ("connmix.log.2026_11_1", "connmix.log.2026_10_31"):
        (tmp_path / stale).write_text("old\n")
    (tmp_path / "connmix.log.notadate").write_text("kept\n")
    LogControl(stream=io.StringIO(), filename=str(path), max_files=2, clock=clock).close()
    assert sorted(os.listdir(tmp_path)) == [
        "connmix.log", "connmix.log.2026_11_22", "connmix.log.2026_11_23", "connmix.log.notadate",
    ]


# --- twistd wiring -------------------------------------------------------------------------------------------


def test_observer_factory_is_callable_and_survives_twistd_options() -> None:
    control = LogControl(stream=io.StringIO())
    factory = observer_factory(control)
    assert factory() is control.observer()
    assert ILogObserver.providedBy(control.observer())

    # twistd's ServerOptions.postOptions runs after the plugin's and resolves `logger` by name.
    options = ServerOptions()
    options["logger"] = factory
    options.postOptions()
    assert AppLogger(options)._observerFactory() is control.observer()  # what AppLogger.start calls
    assert logs.twistd_observer() is control.observer()
