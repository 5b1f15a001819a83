"""Logging end to end (docs/operations.md, "Logging") with a real ``twistd connmix`` process: JSON
lines on stdout and in ``logging.filename`` (directory created, relative path resolved against
the working directory), and SIGHUP switching level and format of both destinations live.
Rotation itself is daily; it is covered with an injected clock in test_logs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from procs import Process, config_data, free_ports, twistd, write_yaml


def file_lines(path: Path, until: str, timeout: float = 10.0) -> list[str]:
    """The lines of ``path`` once one of them contains ``until`` (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if any(until in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_json_lines_on_stdout_and_in_the_log_file_then_text_after_sighup(tmp_path: Path) -> None:
    ports = dict(zip(("registry", "center_api", "mesh", "api", "client"), free_ports(5)))
    logging = {"filename": "logs/connmix.log", "maxFiles": 2, "format": "json", "level": "info"}
    path = write_yaml(tmp_path / "connmix.yaml", config_data(ports, logging=logging))
    process = Process(twistd("--dev", "-f", str(path)), tmp_path)
    try:
        started = json.loads(process.wait_for_line(r"start the protocol server"))
        assert started["level"] == "info" and started["namespace"] == "connmix.server"
        assert started["message"].endswith(f"(127.0.0.1:{ports['client']})")
        assert started["entry"].endswith("lua/entry.websocket.lua")  # keyword fields travel along
        log_file = tmp_path / "logs" / "connmix.log"
        written = [json.loads(line) for line in file_lines(log_file, "start the protocol server")]
        messages = [record["message"] for record in written]
        assert f"start the registry server (127.0.0.1:{ports['registry']})" in messages
        assert any(m.startswith("start the protocol server") for m in messages)

        write_yaml(path, config_data(ports, logging=dict(logging, format="text", level="debug")))
        os.kill(process.pid, signal.SIGHUP)
        line = process.wait_for_line(r"\tconnmix\.config\tconfig reloaded$")
        assert line.split("\t")[1] == "INFO"
        assert file_lines(log_file, "config reloaded")[-1] == line  # the file switched too
    finally:
        assert process.stop() == 0
    assert not [line for line in process.lines if "Traceback" in line]
