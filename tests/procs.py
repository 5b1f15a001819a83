"""Real ``twistd connmix`` processes for tests: start, read their log, stop them by pid.

Every process a test starts is stopped by its own pid (SIGTERM, then SIGKILL after 10 s).  Output
is drained by a thread so a chatty process never blocks on a full pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from connmix_tx.testing import free_ports  # noqa: F401 (re-exported for the tests)

TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
START_TIMEOUT = 15.0


def twistd(*args: str) -> list[str]:
    """The command line of ``twistd -n connmix ARGS`` without a pid file."""
    return [*TWISTD, "-n", "--pidfile=", "connmix", *args]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (bounded to 60 s)."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def config_data(ports: dict[str, int], **sections: Any) -> dict:
    """A dev-mode configuration (as YAML data) with every listener on loopback at ``ports``.

    ``ports`` has ``registry``, ``center_api``, ``mesh``, ``api`` and ``client``; ``sections``
    replace top-level sections, except ``engine``, whose keys are merged.
    """
    data: dict[str, Any] = {
        "center": {
            "registry": {"bind": "127.0.0.1", "port": ports["registry"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["center_api"]},
        },
        "engine": {
            "meshPoint": {"bind": "127.0.0.1", "port": ports["mesh"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["api"]},
            "servers": [{"bind": "127.0.0.1", "port": ports["client"]}],
        },
    }
    for name, value in sections.items():
        if name == "engine":
            data["engine"].update(value)
        else:
            data[name] = value
    return data


def build_wheel(folder: Path, repo: Path) -> Path:
    """Build the wheel of the project at ``repo`` into ``folder`` (as ``pip install .`` would)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(repo)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return next(folder.glob("connmix_tx-*.whl"))


class Process:
    """A long-running process started by a test."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._seen = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT, new: bool = True) -> str:
        """Wait for a log line matching ``pattern`` (only lines after the last match if ``new``)."""
        deadline = time.monotonic() + timeout
        start = self._seen if new else 0
        with self._changed:
            while True:
                for index in range(start, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        self._seen = index + 1
                        return self.lines[index]
                start = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; got:\n" + "\n".join(self.lines))
                self._changed.wait(min(left, 0.2))

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not end within 10 s.  Returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        return code


def gone(pid: int) -> bool:
    """True when no process ``pid`` runs (a zombie waiting for init counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_until(check: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` every 0.1 s until it returns something true (returned), for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


#: Fast cluster timings for tests that start several processes.
FAST_CLUSTER = {"heartbeatInterval": 0.5, "heartbeatTimeout": 1.5, "meshTimeout": 2, "registerTimeout": 10}

#: An entry script that answers "id" with the connection's client id and pushes every other
#: message to queue foo as the seed's entry does (``{msg, ctx}``).
ID_OR_PUSH_ENTRY = r"""
function on_handshake(client_id, headers, server) end
function on_message(msg)
  local conn = mix.websocket()
  if msg.data == "id" then conn:send(conn:client_id()) return end
  mix.queue.push("foo", { msg = msg, ctx = conn:context() })
end
function on_close(client_id, err) end
"""
