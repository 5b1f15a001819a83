"""Log lines of a worker process say which worker wrote them; the supervisor relays them as-is."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher

from connmix_tx.logs import LogControl


def logger_for(control: LogControl) -> Logger:
    return Logger(namespace="connmix.engine", observer=LogPublisher(control.observer()))


def test_text_lines_of_a_worker_suffix_the_namespace() -> None:
    stream = io.StringIO()
    logger_for(LogControl(stream=stream, worker=1)).info("register engine node_id {node_id}", node_id="x")
    assert stream.getvalue().split("\t")[2:] == ["connmix.engine.w1", "register engine node_id x\n"]


def test_json_lines_of_a_worker_carry_a_worker_field() -> None:
    stream = io.StringIO()
    logger_for(LogControl(fmt="json", stream=stream, worker=0)).warn("hello {who}", who="you")
    record = json.loads(stream.getvalue())
    assert record["namespace"] == "connmix.engine"
    assert record["worker"] == 0 and record["who"] == "you" and record["message"] == "hello you"


def test_an_event_field_called_worker_does_not_overwrite_the_index() -> None:
    stream = io.StringIO()
    logger_for(LogControl(fmt="json", stream=stream, worker=2)).info("x {worker}", worker=7)
    assert json.loads(stream.getvalue())["worker"] == 2


def test_a_process_that_is_no_worker_has_neither() -> None:
    text, js = io.StringIO(), io.StringIO()
    logger_for(LogControl(stream=text)).info("x")
    logger_for(LogControl(fmt="json", stream=js)).info("x {worker}", worker=3)
    assert text.getvalue().split("\t")[2] == "connmix.engine"
    assert json.loads(js.getvalue())["worker"] == 3  # the supervisor's own "worker {i} ..." lines


def test_relayed_lines_reach_the_stream_and_the_file_unchanged(tmp_path) -> None:
    stream = io.StringIO()
    control = LogControl(stream=stream, filename=str(tmp_path / "connmix.log"))
    control.write_line("2026-12-06 08:48:29.540192\tINFO\tconnmix.engine.w0\tregister engine\n")
    control.write_line("second line without newline")
    control.close()
    expected = "2026-12-06 08:48:29.540192\tINFO\tconnmix.engine.w0\tregister engine\nsecond line without newline\n"
    assert stream.getvalue() == expected
    assert (tmp_path / "connmix.log").read_text() == expected
