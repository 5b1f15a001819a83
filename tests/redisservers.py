"""Redis for tests: the server ``.ci/run`` starts (``CONNMIX_TEST_REDIS``), or private ones.

``RedisServer`` is a redis-server on a free loopback port, started and stopped (and restarted) by
its pid.  ``redis_address`` is the module-scoped fixture behind both Redis test files: the shared
server, else one started for the module; it skips, saying why, only when there is neither.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from connmix_tx.config import HostPort
from connmix_tx.testing import free_port


def answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private redis-server on a loopback port, stopped (and restarted) by its pid."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("no Redis: CONNMIX_TEST_REDIS is not set and redis-server is not installed "
                        "(.ci/run installs and starts one)")
        self.binary = binary
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    @property
    def address(self) -> HostPort:
        return HostPort("127.0.0.1", self.port)


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostPort]:
    """The test Redis server: CONNMIX_TEST_REDIS, or one started for this module."""
    given = os.environ.get("CONNMIX_TEST_REDIS")
    if given:
        address = HostPort.parse(given)
        if not answers(address.host, address.port):
            pytest.skip(f"CONNMIX_TEST_REDIS={given} does not answer PING")
        yield address
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.address
    finally:
        server.stop()
