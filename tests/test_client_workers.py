"""The SDK opens one API connection per engine, not per worker (workers share the API port)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from connmix_tx.client import Client


def worker_node(node_id: str, number: int, worker: int, engine: str, api: str) -> dict:
    return {"id": node_id, "number": number, "api_server": api, "mesh_point": f"127.0.0.1:{7000 + number}",
            "engine": engine, "worker": worker}


def test_workers_of_one_engine_share_one_link_and_route_to_it() -> None:
    client = Client(center_url="http://127.0.0.1:6787", reactor=MemoryReactorClock())
    client.running = True  # as after start(), without polling
    client._apply_nodes([
        worker_node("a0", 0, 0, "A", "127.0.0.1:6789"),
        worker_node("a1", 1, 1, "A", "127.0.0.1:6789"),
        worker_node("b0", 2, 0, "B", "127.0.0.1:7789"),
    ])
    assert sorted(client.links) == ["127.0.0.1:6789", "127.0.0.1:7789"]
    on_worker_1 = (1 << 22) | (1 << 12) | 5  # a client id of node number 1
    on_engine_b = (1 << 22) | (2 << 12) | 5
    connected = sorted(client.links)
    # Every worker's number names the engine's one link (not only the last worker listed).
    for number in (0, 1):
        assert client.routes.owner((1 << 22) | (number << 12) | 5) == "127.0.0.1:6789"
    assert client.routes.route((1 << 22) | (0 << 12) | 5, connected[::-1]) == "127.0.0.1:6789"
    assert client.routes.route(on_worker_1, connected) == "127.0.0.1:6789"
    assert client.routes.route(on_engine_b, connected[::-1]) == "127.0.0.1:7789"
