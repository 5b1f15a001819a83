"""One engine to its users, for queues: ``twistd connmix --dev -p 2`` as real processes.

The seed walkthrough with two workers: clients land on either worker (the kernel spreads them),
the one consumer on the shared API port gets every message exactly once, naming the worker whose
Lua pushed, and its ``mesh.send`` reaches clients of both workers.  A consumer that leaves
mid-stream loses nothing that was not written to it; a manual consumer's acks reach the worker
that holds the message.  The same walkthrough on the redis backend (shared streams).  Every
process is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.sync.client import ClientConnection, connect

from connmix_tx.testing import free_ports
from procs import FAST_CLUSTER, ID_OR_PUSH_ENTRY, Process, gone, twistd, wait_until, write_yaml


CLIENTS = 24
#: The packaged default entry script (the seed's).
SEED_ENTRY = str(Path(__file__).resolve().parent.parent / "lua" / "entry.websocket.lua")


class Engine:
    """A two-worker engine in dev mode, from a YAML file in a temporary folder."""

    def __init__(self, folder: Path, queue: dict[str, Any] | None = None,
                 redis: list[dict[str, Any]] | None = None, entry: str = "lua/push.lua") -> None:
        self.folder = folder
        self.registry, self.center_api, self.api, self.client = free_ports(4)
        self.mesh = free_ports(2, consecutive=True)[0]
        (folder / "lua").mkdir(exist_ok=True)
        (folder / "lua" / "push.lua").write_text(ID_OR_PUSH_ENTRY)
        luavm: dict[str, Any] = {"queue": queue or {}}
        if redis:
            luavm["redis"] = redis
        self.config = write_yaml(folder / "engine.yaml", {
            "cluster": FAST_CLUSTER,
            "logging": {"level": "info"},
            "center": {"registry": {"bind": "127.0.0.1", "port": self.registry},
                       "apiServer": {"bind": "127.0.0.1", "port": self.center_api}},
            "engine": {
                "meshPoint": {"bind": "127.0.0.1", "port": self.mesh},
                "apiServer": {"bind": "127.0.0.1", "port": self.api},
                "luavm": luavm,
                "servers": [{"bind": "127.0.0.1", "port": self.client, "entry": entry}],
            },
        })
        self.process: Process | None = None
        self.pids: set[int] = set()

    def start(self) -> list[dict[str, Any]]:
        self.process = Process(twistd("--dev", "-f", str(self.config), "-p", "2"), self.folder)
        nodes = wait_until(self._ready, what="2 workers serving")
        # Each worker learns its sibling from the center's next node list push: wait for both links.
        wait_until(lambda: sum("mesh link to" in line and " up" in line for line in self.process.lines) >= 2,
                   what="mesh links between the workers")
        return nodes

    def _ready(self) -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.center_api}/v1/nodes", timeout=5) as r:
                nodes = json.loads(r.read())["nodes"]
        except OSError:
            return None
        assert self.process is not None
        started = sum("start the protocol server" in line for line in self.process.lines)
        return nodes if len(nodes) == 2 and started >= 2 else None

    def stop(self) -> int:
        assert self.process is not None
        for line in self.process.lines:
            if "connmix.supervisor" in line and "started (pid " in line:
                self.pids.add(int(line.rsplit("(pid ", 1)[1].split(")")[0]))
        return self.process.stop()


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Any]:
    engines: list[Engine] = []

    def make(**kwargs: Any) -> Engine:
        engine = Engine(tmp_path, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        if engine.process is not None:
            engine.stop()
            for pid in engine.pids:  # never leave a worker behind, even when a test failed
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)


def node_number(client_id: str) -> int:
    return (int(client_id) >> 12) & 1023


def open_clients(engine: Engine, stack: ExitStack, nodes: list[dict[str, Any]]) -> list[tuple[ClientConnection, str]]:
    """Clients until both workers hold some (the kernel spreads new connections)."""
    clients = []
    while len(clients) < CLIENTS or len({node_number(c) for _, c in clients}) < 2:
        assert len(clients) < 200, "every client landed on the same worker"
        ws = stack.enter_context(connect(f"ws://127.0.0.1:{engine.client}", open_timeout=10))
        ws.send("id")
        clients.append((ws, ws.recv(timeout=10)))
    assert {node_number(c) for _, c in clients} == {n["number"] for n in nodes}
    return clients


def events(api: ClientConnection, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` queue events on ``api`` (anything else fails the test)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        frame = json.loads(api.recv(timeout=max(0.1, deadline - time.monotonic())))
        assert frame.get("event") == "queue.consume", frame
        got.append(frame["result"])
    return got


def request(api: ClientConnection, method: str, params: Any, request_id: int) -> tuple[dict, list[dict]]:
    """Send one request; return its reply and the events that arrived before it."""
    api.send(json.dumps({"method": method, "params": params, "id": request_id}))
    before = []
    while True:
        frame = json.loads(api.recv(timeout=20))
        if frame.get("event") == "queue.consume":
            before.append(frame["result"])
        else:
            assert frame["id"] == request_id, frame
            return frame, before


def check_events(got: list[dict[str, Any]], sent: dict[str, str], nodes: list[dict[str, Any]]) -> None:
    """Every message of ``sent`` (text -> pushing client id) exactly once, naming its worker."""
    by_number = {n["number"]: n["id"] for n in nodes}
    texts = [e["data"]["msg"]["data"] for e in got]
    assert sorted(texts) == sorted(sent), "every message exactly once"
    for event in got:
        text = event["data"]["msg"]["data"]
        assert event["queue"] == "foo"
        assert event["client_id"] == sent[text]
        assert event["node_id"] == by_number[node_number(event["client_id"])], "node_id names the pushing worker"
        assert event["data"]["msg"] == {"data": text, "finish": True, "type": "text"}


def walkthrough(engine: Engine) -> None:
    """The seed walkthrough (push first, then consume; consume first, then push) on two workers."""
    nodes = engine.start()
    with ExitStack() as stack:
        clients = open_clients(engine, stack, nodes)
        sent: dict[str, str] = {}
        for index, (ws, client_id) in enumerate(clients):  # pushed before anyone consumes
            ws.send(f"early {index}")
            sent[f"early {index}"] = client_id
        api = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, got = request(api, "queue.consume", ["foo"], 12345)
        assert reply == {"error": None, "result": {"success": True}, "id": 12345}
        for index, (ws, client_id) in enumerate(clients):  # pushed while the consumer consumes
            ws.send(f"late {index}")
            sent[f"late {index}"] = client_id
        got += events(api, len(sent) - len(got))
        check_events(got, sent, nodes)
        with pytest.raises(TimeoutError):
            api.recv(timeout=0.5)  # and nothing twice
        # Step 5 and 6: the consumer answers clients of both workers with mesh.send.
        for index, (ws, client_id) in enumerate(clients):
            reply, _ = request(api, "mesh.send", [{"client_id": client_id, "data": "hello, world!"}], index)
            assert reply == {"error": None, "result": {"fail": 0, "success": True, "total": 1}, "id": index}
            assert ws.recv(timeout=10) == "hello, world!"
    assert engine.stop() == 0


def test_seed_walkthrough_with_two_workers(engine_factory: Any) -> None:
    walkthrough(engine_factory())


def test_the_seed_walkthrough_unchanged_with_two_workers(engine_factory: Any) -> None:
    """The seed's steps with the packaged entry script: clients learn nothing, the events tell."""
    engine = engine_factory(entry=SEED_ENTRY)
    nodes = engine.start()
    by_number = {n["number"]: n["id"] for n in nodes}
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(f"ws://127.0.0.1:{engine.client}", open_timeout=10))
                   for _ in range(CLIENTS)]
        for index, ws in enumerate(clients):
            ws.send(f"test {index}")  # step 2, before anyone consumes
        api = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        api.send('{"method":"queue.consume","params":["foo"],"id":12345}')
        reply = api.recv(timeout=10)
        got = []
        if json.loads(reply).get("event"):
            got.append(json.loads(reply)["result"])
            reply = api.recv(timeout=10)
        assert json.loads(reply) == {"error": None, "result": {"success": True}, "id": 12345}  # step 3
        got += events(api, CLIENTS - len(got))
        ids = {}
        for event in got:
            text = event["data"]["msg"]["data"]
            assert event["data"]["msg"] == {"data": text, "finish": True, "type": "text"}
            headers = event["data"]["ctx"]["headers"]
            assert headers["host"] == f"127.0.0.1:{engine.client}" and headers["upgrade"] == "websocket"
            assert event["queue"] == "foo" and len(event["client_id"]) == 19 and len(event["node_id"]) == 20
            assert event["node_id"] == by_number[node_number(event["client_id"])]
            ids[int(text.split()[1])] = event["client_id"]
        assert sorted(ids) == list(range(CLIENTS))
        assert {node_number(c) for c in ids.values()} == set(by_number), "clients on both workers"
        for index, ws in enumerate(clients):  # step 4: one more event per message
            ws.send(f"again {index}")
        again = events(api, CLIENTS)
        assert sorted(e["data"]["msg"]["data"] for e in again) == sorted(f"again {i}" for i in range(CLIENTS))
        assert all(ids[int(e["data"]["msg"]["data"].split()[1])] == e["client_id"] for e in again)
        for index, ws in enumerate(clients):  # steps 5 and 6
            api.send(json.dumps({"method": "mesh.send", "params": [{"client_id": ids[index], "data": "hello, world!"}],
                                 "id": 12345}))
            assert json.loads(api.recv(timeout=10)) == {"error": None, "result": {"fail": 0, "success": True, "total": 1},
                                                        "id": 12345}
            assert ws.recv(timeout=10) == "hello, world!"
    assert engine.stop() == 0


def test_seed_walkthrough_with_two_workers_on_the_redis_backend(engine_factory: Any, redis_address: Any) -> None:
    walkthrough(engine_factory(
        queue={"backend": "redis", "redis": "default", "prefix": f"connmix:test:{uuid.uuid4().hex}:"},
        redis=[{"name": "default", "addr": f"{redis_address.host}:{redis_address.port}"}],
    ))


def test_a_consumer_leaving_mid_stream_loses_nothing_that_was_not_written(engine_factory: Any) -> None:
    engine = engine_factory()
    nodes = engine.start()
    with ExitStack() as stack:
        clients = open_clients(engine, stack, nodes)
        sent: dict[str, str] = {}
        for round_ in range(60):  # more than the first consumer's buffers take before it leaves
            for index, (ws, client_id) in enumerate(clients):
                ws.send(f"m {round_} {index}")
                sent[f"m {round_} {index}"] = client_id
        first = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, got_first = request(first, "queue.consume", ["foo"], 1)
        assert reply["result"] == {"success": True}
        got_first += events(first, max(0, 20 - len(got_first)))
        # It leaves while the siblings' events are on their way: what was written before the reply
        # arrives before it; nothing after it.
        reply, more = request(first, "queue.unconsume", [], 2)
        assert reply["result"] == {"success": True}
        got_first += more
        assert len(got_first) < len(sent)
        second = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, got_second = request(second, "queue.consume", ["foo"], 3)
        assert reply["result"] == {"success": True}
        got_second += events(second, len(sent) - len(got_first) - len(got_second), timeout=60)
        check_events(got_first + got_second, sent, nodes)  # the union is everything, once
    assert engine.stop() == 0


def test_manual_acks_reach_the_worker_holding_the_message(engine_factory: Any) -> None:
    engine = engine_factory()
    nodes = engine.start()
    with ExitStack() as stack:
        clients = open_clients(engine, stack, nodes)
        sent: dict[str, str] = {}
        for index, (ws, client_id) in enumerate(clients):
            ws.send(f"job {index}")
            sent[f"job {index}"] = client_id
        first = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, got = request(first, "queue.consume", [{"queues": ["foo"], "ack": "manual"}], 1)
        assert reply["result"] == {"success": True}
        got += events(first, len(sent) - len(got))
        check_events(got, sent, nodes)
        ids = [e["message_id"] for e in got]
        assert len(set(ids)) == len(ids)
        assert any(i.startswith("w") and ":" in i for i in ids), "ids of the sibling's messages"
        # Acknowledge every second message (ids of both workers), then leave without the rest.
        acked = got[::2]
        reply, _ = request(first, "queue.ack", [{"queue": "foo", "ids": [e["message_id"] for e in acked]}], 2)
        assert reply["result"] == {"acked": len(acked), "success": True}
        reply, _ = request(first, "queue.ack", [{"queue": "foo", "ids": [e["message_id"] for e in acked]}], 3)
        assert reply["result"] == {"acked": 0, "success": True}  # already acknowledged
        first.close()
        # The unacknowledged ones come again, from the worker that holds each, to the next consumer.
        second = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, again = request(second, "queue.consume", ["foo"], 4)
        assert reply["result"] == {"success": True}
        left = {e["data"]["msg"]["data"]: sent[e["data"]["msg"]["data"]] for e in got[1::2]}
        again += events(second, len(left) - len(again))
        check_events(again, left, nodes)
        with pytest.raises(TimeoutError):
            second.recv(timeout=0.5)  # the acknowledged ones never come back
    assert engine.stop() == 0


def server_pid(pids: list[int], api: ClientConnection, api_port: int) -> int:
    """Which of ``pids`` holds the server side of the API connection ``api`` (from /proc)."""
    local = api.socket.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        here, there = (int(a.split(":")[1], 16) for a in fields[1:3])
        if here == api_port and there == local:
            inode = fields[9]
    assert inode is not None, "the API connection's server socket"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the API connection")


def test_a_restarted_worker_gets_the_open_consumption_again(engine_factory: Any) -> None:
    engine = engine_factory()
    nodes = engine.start()
    assert engine.process is not None
    workers = {}
    for line in engine.process.lines:
        if "connmix.supervisor" in line and "started (pid " in line:
            index = int(line.split("worker ", 1)[1].split()[0])
            workers[index] = int(line.rsplit("(pid ", 1)[1].split(")")[0])
    with ExitStack() as stack:
        api = stack.enter_context(connect(f"ws://127.0.0.1:{engine.api}/ws/v1", open_timeout=10))
        reply, _ = request(api, "queue.consume", ["foo"], 1)
        assert reply["result"] == {"success": True}
        holder = server_pid(list(workers.values()), api, engine.api)
        [(index, victim)] = [(i, pid) for i, pid in workers.items() if pid != holder]
        os.kill(victim, signal.SIGKILL)  # the other worker dies and comes back as a new node
        old = {n["id"] for n in nodes}

        def restarted() -> list[dict[str, Any]] | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.center_api}/v1/nodes", timeout=5) as r:
                now = json.loads(r.read())["nodes"]
            lines = engine.process.lines
            exits = [i for i, line in enumerate(lines) if f"worker {index} (pid {victim}) exited" in line]
            back = bool(exits) and any(f"connmix.server.w{index}\tstart the protocol server" in line
                                       for line in lines[exits[-1]:])
            return now if len(now) == 2 and len({n["id"] for n in now} - old) == 1 and back else None

        nodes = wait_until(restarted, what="the killed worker back as a new node")
        time.sleep(1.5)  # the next node list push: the survivor sends its consumption again
        clients = open_clients(engine, stack, nodes)
        sent = {}
        for i, (ws, client_id) in enumerate(clients):
            ws.send(f"after {i}")
            sent[f"after {i}"] = client_id
        check_events(events(api, len(sent)), sent, nodes)
    assert engine.stop() == 0
