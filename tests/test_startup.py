"""``twistd connmix`` as a user runs it: real processes, banner, start-up lines, exit codes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO
from procs import TWISTD, Process, build_wheel, free_ports, run, twistd, write_yaml

def write_config(path: Path, ports: dict[str, int], **engine_extra: object) -> Path:
    return write_yaml(path, {
        "center": {
            "registry": {"bind": "127.0.0.1", "port": ports["registry"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["center_api"]},
        },
        "engine": {
            "meshPoint": {"bind": "127.0.0.1", "port": ports["mesh"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["api"]},
            "servers": [{"bind": "127.0.0.1", "port": ports["client"], **engine_extra}],
        },
    })


@pytest.fixture
def ports() -> dict[str, int]:
    return dict(zip(("registry", "center_api", "mesh", "api", "client"), free_ports(5)))


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def test_version_line(tmp_path: Path) -> None:
    result = run([*TWISTD, "connmix", "--version"], tmp_path)
    assert result.returncode == 0
    assert re.fullmatch(
        r"connmix-tx \S+, python3\.\d+\.\d+, twisted\S+, LuaJIT 2\.1\.\d+\+bit, \w+, \w+\n", result.stdout
    )


def test_dev_mode_logs_startup_lines_in_order_and_serves(
    tmp_path: Path, ports: dict[str, int], processes: list[Process]
) -> None:
    config = write_config(tmp_path / "dev.yaml", ports)
    process = Process(twistd("--dev", "-f", str(config)), tmp_path)
    processes.append(process)
    process.wait_for_line(r"start the protocol server")
    text = "\n".join(process.lines)
    assert re.search(r"connmix-tx \S+, python\S+, twisted\S+, LuaJIT", text)
    expected = [
        f"WARN\tconnmix.config\tdev mode: center and engine run in one process",
        f"INFO\tconnmix.registry\tstart the registry server (127.0.0.1:{ports['registry']})",
        f"INFO\tconnmix.center\tstart the center api server (127.0.0.1:{ports['center_api']})",
        f"INFO\tconnmix.mesh\tstart the mesh node (127.0.0.1:{ports['mesh']})",
        f"INFO\tconnmix.api\tstart the api server (127.0.0.1:{ports['api']})",
        f"INFO\tconnmix.engine\tcenter registry 127.0.0.1:{ports['registry']} connect successful",
        "INFO\tconnmix.engine\tregister engine node_id ",
        f"INFO\tconnmix.server\tstart the protocol server {REPO / 'lua' / 'entry.websocket.lua'}"
        f" (127.0.0.1:{ports['client']})",
    ]
    positions = []
    for needle in expected:
        found = [i for i, line in enumerate(process.lines) if needle in line]
        assert found, f"missing start-up line {needle!r} in:\n{text}"
        positions.append(found[0])
    assert positions == sorted(positions)
    assert re.search(r"register engine node_id [0-9a-v]{20} number 0", text)
    assert re.search(r"register node 127\.0\.0\.1 node_id [0-9a-v]{20} number 0", text)

    # The seed walkthrough against the real process, with the sync websockets client.
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{ports['client']}") as client, \
            connect(f"ws://127.0.0.1:{ports['api']}/ws/v1") as api:
        client.send("test")
        api.send('{"method":"queue.consume","params":["foo"],"id":12345}')
        assert json.loads(api.recv(timeout=5)) == {"error": None, "result": {"success": True}, "id": 12345}
        event = json.loads(api.recv(timeout=5))
        assert event["result"]["data"]["msg"] == {"data": "test", "finish": True, "type": "text"}
        client_id = event["result"]["client_id"]
        api.send(json.dumps({"method": "mesh.send", "params": [{"client_id": client_id, "data": "hello, world!"}],
                             "id": 12345}))
        assert json.loads(api.recv(timeout=5))["result"] == {"fail": 0, "success": True, "total": 1}
        assert client.recv(timeout=5) == "hello, world!"

    # The center API lists the engine.
    with socket.create_connection(("127.0.0.1", ports["center_api"]), timeout=5) as s:
        s.sendall(b"GET /v1/nodes HTTP/1.0\r\n\r\n")
        body = b"".join(iter(lambda: s.recv(65536), b"")).split(b"\r\n\r\n", 1)[1]
    nodes = json.loads(body)["nodes"]
    assert [n["number"] for n in nodes] == [0]
    assert nodes[0]["api_server"] == f"127.0.0.1:{ports['api']}"

    assert process.stop() == 0


def fatal_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("engine:\n  apiServer:\n    maxMessgeSize: 10\n",
         "connmix: config engine.apiServer.maxMessgeSize: unknown key"),
        ("engine:\n  servers:\n    - port: abc\n",
         "connmix: config engine.servers[0].port: expected integer, got string"),
        ("logging:\n  level: verbose\n",
         "connmix: config logging.level: expected one of debug, info, warn, error, got 'verbose'"),
        ("engine:\n  servers:\n    - entry: lua/missing.lua\n",
         "connmix: config engine.servers[0].entry: file not found: "),
    ],
)
def test_bad_config_stops_startup_with_one_line_and_exit_2(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run(twistd("--dev", "-f", str(config)), tmp_path)
    assert result.returncode == 2
    assert fatal_line(result).startswith(expected)


def test_broken_entry_script_is_exit_2_with_file_and_line(tmp_path: Path, ports: dict[str, int]) -> None:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "broken.lua").write_text("function on_handshake()\nend\nthis is not lua\n")
    config = write_config(tmp_path / "c.yaml", ports, entry="lua/broken.lua")
    result = run(twistd("--dev", "-f", str(config)), tmp_path)
    assert result.returncode == 2
    assert "lua/broken.lua:3:" in fatal_line(result)


def test_busy_port_is_exit_3_naming_the_port(tmp_path: Path, ports: dict[str, int]) -> None:
    config = write_config(tmp_path / "c.yaml", ports)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["api"]))
        busy.listen()
        result = run(twistd("--dev", "-f", str(config)), tmp_path)
    assert result.returncode == 3
    assert fatal_line(result) == (
        f"connmix: cannot listen on 127.0.0.1:{ports['api']} (engine.apiServer): address already in use"
    )


def test_busy_protocol_server_port_is_exit_3_after_registration(tmp_path: Path, ports: dict[str, int]) -> None:
    config = write_config(tmp_path / "c.yaml", ports)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["client"]))
        busy.listen()
        result = run(twistd("--dev", "-f", str(config)), tmp_path)
    assert result.returncode == 3
    assert fatal_line(result) == (
        f"connmix: cannot listen on 127.0.0.1:{ports['client']} (engine.servers[0]): address already in use"
    )


@pytest.mark.parametrize("args", [[], ["--dev", "--role", "engine"], ["--role", "mars"]])
def test_usage_errors_exit_1(tmp_path: Path, args: list[str]) -> None:
    result = run(twistd(*args), tmp_path)
    assert result.returncode == 1


def test_engine_without_center_exits_4(tmp_path: Path, ports: dict[str, int]) -> None:
    config = write_config(tmp_path / "c.yaml", ports)
    text = config.read_text() + "cluster:\n  registerTimeout: 1\n"
    config.write_text(text.replace("engine:\n", f"engine:\n  centerRegistry: 127.0.0.1:{ports['registry']}\n", 1))
    result = run(twistd("--role", "engine", "-f", str(config)), tmp_path)
    assert result.returncode == 4
    assert fatal_line(result) == (
        f"connmix: cannot reach center registry 127.0.0.1:{ports['registry']}: connection refused"
    )


def test_regular_install_runs_from_another_folder(
    tmp_path: Path, ports: dict[str, int], processes: list[Process]
) -> None:
    """A non-editable install carries its default config and Lua scripts."""
    target = tmp_path / "site"
    wheel = build_wheel(tmp_path / "wheel", REPO)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    config = write_config(workdir / "c.yaml", ports)
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}
    process = Process(twistd("--dev", "-f", str(config)), workdir, env)
    processes.append(process)
    line = process.wait_for_line(r"start the protocol server")
    assert f"{target / 'connmix_tx' / '_home' / 'lua' / 'entry.websocket.lua'} (127.0.0.1:" in line
    assert process.stop() == 0
