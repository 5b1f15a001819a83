"""A real cluster for tests: one center and engines as separate ``twistd connmix`` processes.

``Cluster`` writes one YAML file per process into a temporary folder (loopback ports picked with
``free_ports``, fast heartbeats) and stops every process it started by its pid.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from procs import Process, free_ports, twistd, write_yaml

FAST = {"heartbeatInterval": 0.5, "heartbeatTimeout": 1.5, "meshTimeout": 5, "registerTimeout": 10}

# An entry that forwards "to:<client_id>:<text>" with mix.mesh.send and "pub:<channel>:<text>"
# with mix.mesh.publish, and pushes every other message to queue foo like the default entry.
FORWARDER = r"""
function on_handshake(client_id, headers, server) end
function on_message(msg)
  local conn = mix.websocket()
  local target, text = string.match(msg.data, "^to:(%d+):(.*)$")
  if target then
    local err = mix.mesh.send(target, text)
    conn:send("sent:" .. tostring(err))
    return
  end
  local channel, body = string.match(msg.data, "^pub:([^:]+):(.*)$")
  if channel then
    local ok, fail = mix.mesh.publish(channel, body)
    conn:send("published:" .. ok .. "/" .. fail)
    return
  end
  if msg.data == "sub" then conn:subscribe("room") conn:send("subscribed") return end
  mix.queue.push("foo", { msg = msg, ctx = conn:context() })
end
function on_close(client_id, err) end
"""


class Cluster:
    """A center and engines started from YAML files in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.registry, self.center_api = free_ports(2)
        self.processes: list[Process] = []
        self.engines: dict[str, dict[str, int]] = {}
        (folder / "lua").mkdir()
        (folder / "lua" / "forward.lua").write_text(FORWARDER)

    def start_center(self) -> Process:
        config = write_yaml(self.folder / "center.yaml", {
            "cluster": FAST,
            "center": {
                "registry": {"bind": "127.0.0.1", "port": self.registry},
                "apiServer": {"bind": "127.0.0.1", "port": self.center_api},
            },
        })
        process = self._start("--role", "center", "-f", str(config))
        process.wait_for_line(r"start the center api server")
        return process

    def start_engine(self, name: str, wait: bool = True) -> Process:
        if name not in self.engines:
            mesh, api, client = free_ports(3)
            self.engines[name] = {"mesh": mesh, "api": api, "client": client}
        ports = self.engines[name]
        config = write_yaml(self.folder / f"{name}.yaml", {
            "cluster": FAST,
            "engine": {
                "centerRegistry": f"127.0.0.1:{self.registry}",
                "meshPoint": {"bind": "127.0.0.1", "port": ports["mesh"]},
                "apiServer": {"bind": "127.0.0.1", "port": ports["api"]},
                "servers": [{"bind": "127.0.0.1", "port": ports["client"], "entry": "lua/forward.lua"}],
            },
        })
        process = self._start("--role", "engine", "-f", str(config))
        if wait:
            process.wait_for_line(r"start the protocol server")
        return process

    def _start(self, *args: str) -> Process:
        process = Process(twistd(*args), self.folder)
        self.processes.append(process)
        return process

    def nodes(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.center_api}/v1/nodes", timeout=5) as response:
            return json.loads(response.read())["nodes"]

    def wait_nodes(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = self.nodes()
                if len(nodes) == count:
                    return nodes
            except OSError:
                nodes = []
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} nodes, got {nodes}")
            time.sleep(0.1)

    def client_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.engines[name]['client']}"

    def api_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.engines[name]['api']}/ws/v1"

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@contextlib.contextmanager
def running_cluster(folder: Path, engines: tuple[str, ...] = ("a", "b")) -> Iterator[Cluster]:
    """A center and ``engines``, all registered; every process is stopped on the way out."""
    cluster = Cluster(folder)
    try:
        cluster.start_center()
        for name in engines:
            cluster.start_engine(name)
        cluster.wait_nodes(len(engines))
        yield cluster
    finally:
        cluster.stop()
