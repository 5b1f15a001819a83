"""A real cluster: one center and two engines as separate processes on loopback (docs/operations.md,
"The cluster").

Routing of send / call / publish both ways (API and Lua), an engine killed with SIGKILL, a center
restart.  Every process is stopped by its pid at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.sync.client import connect

from clusterprocs import Cluster, running_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as running:
        yield running


def call(api: Any, method: str, params: list, request_id: int = 1) -> dict:
    api.send(json.dumps({"method": method, "params": params, "id": request_id}))
    return json.loads(api.recv(timeout=5))


def client_id_of(cluster: Cluster, name: str, client: Any) -> str:
    """The client id of ``client`` (on engine ``name``), learnt through that engine's queue."""
    with connect(cluster.api_url(name)) as api:
        call(api, "queue.consume", ["foo"])
        client.send("whoami")
        return json.loads(api.recv(timeout=5))["result"]["client_id"]


def test_engines_register_and_route_both_ways(cluster: Cluster) -> None:
    nodes = cluster.nodes()
    assert sorted(n["number"] for n in nodes) == [0, 1]
    assert {n["api_server"] for n in nodes} == {f"127.0.0.1:{cluster.engines[e]['api']}" for e in "ab"}

    with connect(cluster.client_url("a")) as on_a, connect(cluster.client_url("b")) as on_b:
        id_a, id_b = client_id_of(cluster, "a", on_a), client_id_of(cluster, "b", on_b)
        with connect(cluster.api_url("a")) as api_a, connect(cluster.api_url("b")) as api_b:
            # API mesh.send, each engine to the other's client.
            assert call(api_a, "mesh.send", [{"client_id": id_b, "data": "a->b"}])["result"]["total"] == 1
            assert on_b.recv(timeout=5) == "a->b"
            assert call(api_b, "mesh.send", [{"client_id": id_a, "data": "b->a"}])["result"]["total"] == 1
            assert on_a.recv(timeout=5) == "b->a"

            # conn.call from A changes the context of B's client; B's queue shows it.
            spec = {"client_id": id_b, "func": "set_context_value", "args": ["user", 7]}
            assert call(api_a, "conn.call", [spec])["result"] == {"success": True}
            call(api_b, "queue.consume", ["foo"])
            on_b.send("with context")
            assert json.loads(api_b.recv(timeout=5))["result"]["data"]["ctx"]["user"] == 7

            # Subscriptions on both engines: a publish from either counts both.
            for client_id, api in ((id_a, api_a), (id_b, api_a)):
                spec = {"client_id": client_id, "func": "subscribe", "args": ["room"]}
                assert call(api, "conn.call", [spec])["result"] == {"success": True}
            published = call(api_b, "mesh.publish", [{"channel": "room", "data": "all"}])
            assert published["result"] == {"fail": 0, "success": True, "total": 2}
            assert on_a.recv(timeout=5) == "all" and on_b.recv(timeout=5) == "all"

            # A client id of a number no engine holds: node unavailable, at once.
            foreign = str((int(id_a) & ~(1023 << 12)) | (77 << 12))
            assert call(api_a, "mesh.send", [{"client_id": foreign, "data": "x"}])["error"]["code"] == 401

        # Lua's mix.mesh.send and mix.mesh.publish cross engines too.
        on_a.send(f"to:{id_b}:lua says hi")
        assert on_b.recv(timeout=5) == "lua says hi"
        assert on_a.recv(timeout=5) == "sent:nil"
        on_b.send("pub:room:lua publish")
        assert on_a.recv(timeout=5) == "lua publish"
        assert on_b.recv(timeout=5) == "lua publish"
        assert on_b.recv(timeout=5) == "published:2/0"


def test_killed_engine_is_dropped_and_can_rejoin(cluster: Cluster) -> None:
    b = cluster.processes[2]
    with connect(cluster.client_url("b")) as on_b:
        id_b = client_id_of(cluster, "b", on_b)
        b.kill()
        nodes = cluster.wait_nodes(1, timeout=5)
        assert nodes[0]["api_server"] == f"127.0.0.1:{cluster.engines['a']['api']}"
        with connect(cluster.api_url("a")) as api_a:
            started = time.monotonic()
            reply = call(api_a, "mesh.send", [{"client_id": id_b, "data": "anyone?"}])
            assert reply["error"]["code"] == 401
            assert time.monotonic() - started < 5
            assert call(api_a, "mesh.publish", [{"channel": "room", "data": "x"}])["result"]["total"] == 0

    cluster.start_engine("b")
    nodes = cluster.wait_nodes(2)
    new_b = next(n for n in nodes if n["api_server"].endswith(f":{cluster.engines['b']['api']}"))
    assert new_b["number"] != 1  # the dead engine's number stays reserved for numberReserve
    with connect(cluster.client_url("b")) as on_b, connect(cluster.api_url("a")) as api_a:
        id_b = client_id_of(cluster, "b", on_b)
        assert call(api_a, "mesh.send", [{"client_id": id_b, "data": "welcome back"}])["result"]["total"] == 1
        assert on_b.recv(timeout=5) == "welcome back"


def test_engines_keep_routing_while_the_center_is_down(cluster: Cluster) -> None:
    numbers = {n["api_server"]: n["number"] for n in cluster.nodes()}
    center = cluster.processes[0]
    assert center.stop() == 0
    with connect(cluster.client_url("b")) as on_b, connect(cluster.api_url("a")) as api_a:
        id_b = client_id_of(cluster, "b", on_b)
        assert call(api_a, "mesh.send", [{"client_id": id_b, "data": "no center"}])["result"]["total"] == 1
        assert on_b.recv(timeout=5) == "no center"

    cluster.start_center()
    nodes = cluster.wait_nodes(2, timeout=15)
    assert {n["api_server"]: n["number"] for n in nodes} == numbers


def test_engine_started_before_the_center_waits_for_it(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        engine = cluster.start_engine("a", wait=False)
        time.sleep(1.5)  # the engine retries every second meanwhile; no client port yet
        assert not any("start the protocol server" in line for line in engine.lines)
        cluster.start_center()
        engine.wait_for_line(r"start the protocol server")
        assert [n["number"] for n in cluster.wait_nodes(1)] == [0]
    finally:
        cluster.stop()
