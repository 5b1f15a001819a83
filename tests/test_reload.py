"""SIGHUP reload (docs/operations.md): a real ``twistd connmix`` process, good and bad files; and
the reloader driven in process, where the effect on every hot key can be inspected.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import in_asyncio, start_engine
from connmix_tx.config import load_config, reload_diff
from connmix_tx.reload import Reloader, effective_config
from connmix_tx.testing import LogCapture
from procs import Process, config_data, free_ports, twistd, write_yaml


def get(port: int, path: str, user: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if user is not None:
        token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


ALICE = {"username": "alice", "password": "pw-a", "roles": ["read", "write"]}
BOB = {"username": "bob", "password": "pw-b", "roles": ["read", "write"]}


@pytest.fixture
def ports() -> dict[str, int]:
    return dict(zip(("registry", "center_api", "mesh", "api", "client"), free_ports(5)))


def test_sighup_applies_hot_keys_refuses_bad_files_and_keeps_connections(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    path = write_yaml(tmp_path / "connmix.yaml", config_data(ports))
    process = Process(twistd("--dev", "-f", str(path)), tmp_path)
    stack = contextlib.ExitStack()
    try:
        process.wait_for_line(r"start the protocol server")
        client = stack.enter_context(connect(f"ws://127.0.0.1:{ports['client']}"))
        assert get(ports["api"], "/metrics") == 200

        # A good file: new log level and format, users, a smaller queue, and one cold key.
        write_yaml(path, config_data(
            ports, logging={"level": "debug", "format": "json"}, access={"users": [ALICE, BOB]},
            engine={"luavm": {"queue": {"topicSize": 1}},
                    "apiServer": {"bind": "127.0.0.1", "port": ports["api"], "readTimeout": 30}},
            cluster={"meshTimeout": 9},
        ))
        os.kill(process.pid, signal.SIGHUP)
        process.wait_for_line(r"config reload: cluster\.meshTimeout changed, restart required")
        reloaded = json.loads(process.wait_for_line(r'"message":"config reloaded"'))
        assert reloaded["level"] == "info" and reloaded["namespace"] == "connmix.config"
        assert get(ports["api"], "/metrics") == 401
        assert get(ports["api"], "/metrics", ("alice", "pw-a")) == 200
        assert get(ports["center_api"], "/v1/nodes", ("bob", "pw-b")) == 200
        client.ping().wait(5)  # the client connection survived the reload
        client.send("one")
        client.send("two")  # topicSize 1: the second push fails, the script answers with the error
        assert json.loads(client.recv(timeout=5)) == {"error": "queue full"}

        # Users removed: their open API WebSockets are closed with 4001, the others stay.
        token = base64.b64encode(b"alice:pw-a").decode()
        alice = stack.enter_context(connect(f"ws://127.0.0.1:{ports['api']}/ws/v1",
                                            additional_headers={"Authorization": f"Basic {token}"}))
        bob = stack.enter_context(connect(f"ws://127.0.0.1:{ports['api']}/ws/v1?username=bob&password=pw-b"))
        write_yaml(path, config_data(ports, logging={"level": "debug", "format": "json"},
                                     access={"users": [BOB]}))
        os.kill(process.pid, signal.SIGHUP)
        process.wait_for_line(r'"message":"config reloaded"')
        with pytest.raises(ConnectionClosed):
            alice.recv(timeout=5)
        assert alice.close_code == 4001
        bob.send(json.dumps({"m": "server.ping", "i": 1}))
        assert json.loads(bob.recv(timeout=5))["E"] is None
        assert get(ports["api"], "/metrics", ("alice", "pw-a")) == 401

        # A bad file: refused, the running configuration stays (users, json lines).
        path.write_text("logging:\n  level: verbose\n")
        os.kill(process.pid, signal.SIGHUP)
        failed = json.loads(process.wait_for_line(r"config reload failed"))
        assert failed["message"] == ("config reload failed: config logging.level: expected one of "
                                     "debug, info, warn, error, got 'verbose'")
        assert failed["level"] == "error"
        path.write_text("engine: [unclosed\n")
        os.kill(process.pid, signal.SIGHUP)
        process.wait_for_line(r"config reload failed: config: invalid YAML")
        assert get(ports["api"], "/metrics") == 401
        assert get(ports["api"], "/metrics", ("bob", "pw-b")) == 200
        client.ping().wait(5)

        # Back to text at warn level: info lines disappear, warnings stay.
        write_yaml(path, config_data(ports, logging={"level": "warn", "format": "text"},
                                     cluster={"meshTimeout": 9}))
        os.kill(process.pid, signal.SIGHUP)
        line = process.wait_for_line(r"config reload: cluster\.meshTimeout changed, restart required")
        assert line.split("\t")[1:3] == ["WARN", "connmix.config"]
        stack.close()
    finally:
        code = process.stop()
        stack.close()
    assert code == 0
    assert not [line for line in process.lines if "Traceback" in line]


# In process ---------------------------------------------------------------------------------


class FakeHotReloader:
    def __init__(self) -> None:
        self.intervals: list[float] = []

    def set_interval(self, seconds: float) -> None:
        self.intervals.append(seconds)

    def stop(self) -> None:
        pass


@in_asyncio
async def test_reloader_applies_each_hot_key_in_process(tmp_path: Path, ports: dict[str, int]) -> None:
    path = write_yaml(tmp_path / "c.yaml", config_data(ports))
    running = await start_engine(load_config(str(path)))
    try:
        engine = running.service.engine
        fake = FakeHotReloader()
        engine.reloaders = [fake]
        factory = engine.client_factories[0]
        old_wheel = factory.wheel
        reloader = Reloader(running.service)
        write_yaml(path, config_data(ports, engine={
            "luavm": {"maxInstructions": 1234, "queue": {"topicSize": 5, "maxTopics": 7}},
            "apiServer": {"bind": "127.0.0.1", "port": ports["api"], "maxMessageSize": 4096,
                          "maxWriteBuffer": 70000, "writeTimeout": 3},
            "servers": [{"bind": "127.0.0.1", "port": ports["client"], "byteCodeExpires": 3,
                         "readTimeout": 7, "writeTimeout": 4, "maxMessageSize": 100,
                         "maxWriteBuffer": 5000, "compression": True,
                         "options": [{"name": "path", "value": "/chat"}, {"name": "x", "value": 1}]}],
        }))
        with LogCapture() as logs:
            reloader.reload()
        assert logs.find("config reloaded") and not logs.find("restart required")
        assert (engine.queues.topic_size, engine.queues.max_topics) == (5, 7)
        assert fake.intervals == [3]
        assert factory.config.write_timeout == 4 and factory.path == "/chat"
        assert factory.maxMessagePayloadSize == 100 and factory.wheel.timeout == 7
        assert factory.wheel is not old_wheel and old_wheel.timeout == 60  # open conns keep theirs
        assert factory.perMessageCompressionAccept([]) is None
        assert engine.libraries[0].options == {"path": "/chat", "x": "1"}
        api = engine.api_factory
        assert api.config.max_write_buffer == 70000 and api.maxMessagePayloadSize == 4096
        assert running.service.config.engine.luavm.max_instructions == 1234

        # A reload during a reload runs after it, not inside it.
        calls: list[str] = []
        original = reloader._reload_once

        def nested() -> None:
            calls.append("start")
            if len(calls) == 1:
                reloader.reload()
            original()
            calls.append("end")

        reloader._reload_once = nested  # type: ignore[method-assign]
        reloader.reload()
        assert calls == ["start", "end", "start", "end"]
    finally:
        await running.stop()


def test_effective_config_keeps_restart_only_keys(tmp_path: Path) -> None:
    ports = dict(zip(("registry", "center_api", "mesh", "api", "client"), range(7001, 7006)))
    old = load_config(str(write_yaml(tmp_path / "a.yaml", config_data(ports))))
    changed = dict(ports, client=7010)
    new = load_config(str(write_yaml(tmp_path / "b.yaml", config_data(
        changed, logging={"level": "debug"}, cluster={"secret": "s"},
        engine={"servers": [{"bind": "127.0.0.1", "port": 7010, "readTimeout": 5}]}))))
    hot, cold = reload_diff(old, new)
    assert cold == ["cluster.secret", "engine.servers[0].port"]
    merged = effective_config(old, new, cold)
    assert merged.cluster.secret == "" and merged.engine.servers[0].port == 7005
    assert merged.engine.servers[0].read_timeout == 5 and merged.logging.level == "debug"
    assert merged.source == old.source
    more = load_config(str(write_yaml(tmp_path / "c.yaml", config_data(
        ports, engine={"servers": [{"bind": "127.0.0.1", "port": 7005},
                                   {"bind": "127.0.0.1", "port": 7006}]}))))
    _, cold = reload_diff(old, more)
    assert cold == ["engine.servers"]
    assert effective_config(old, more, cold).engine.servers == old.engine.servers


def test_a_reload_checks_the_mesh_ports_of_the_workers_that_run_not_of_the_file(tmp_path: Path) -> None:
    from types import SimpleNamespace

    ports = dict(zip(("registry", "center_api", "api", "client"), range(7001, 7005)), mesh=65535)
    path = write_yaml(tmp_path / "c.yaml", config_data(ports))
    # A worker started with -p 2 (the file says one worker): the second mesh port would be 65536.
    root = SimpleNamespace(config=load_config(str(path)), role="dev", engine=None)
    before = root.config
    with LogCapture() as logs:
        Reloader(root, workers=2).reload()
    assert logs.find("config reload failed") and root.config is before
    # -p 1 with a file asking for four workers: one mesh port is all that is needed.
    path = write_yaml(tmp_path / "d.yaml", config_data(dict(ports, mesh=65534), engine={"workers": 4}))
    root = SimpleNamespace(config=load_config(str(path), workers=1), role="dev", engine=None)
    with LogCapture() as logs:
        Reloader(root, workers=1).reload()
    assert logs.find("config reloaded") and not logs.find("config reload failed")
