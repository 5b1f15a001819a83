"""``GET /metrics`` (docs/operations.md, Metrics): scraped from a real service tree after real
traffic.

The metrics are parsed with prometheus_client's own text parser; the tests check that the names
of docs/operations.md exist, that counters move with the traffic that should move them, and that
two service trees in one process keep separate registries.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.meter import NullMeter, ServerMeter
from connmix_tx.metrics import EngineMeter, ServerCounts
from connmix_tx.tally import exposition
from netclients import api_call, basic, http_request, post

ENGINE_NAMES = {
    "connmix_engine_servers_clients", "connmix_engine_servers_read_messages",
    "connmix_engine_servers_send_messages", "connmix_engine_servers_send_errors",
    "connmix_engine_servers_send_duration_seconds", "connmix_engine_channels",
    "connmix_engine_queue_length", "connmix_engine_queue_consumers", "connmix_engine_queue_push",
    "connmix_engine_queue_delivered", "connmix_engine_api_connections", "connmix_engine_api_requests",
    "connmix_engine_slow_disconnects", "connmix_engine_mesh_peers", "connmix_engine_mesh_batches",
    "connmix_engine_mesh_messages", "connmix_engine_lua_errors", "connmix_engine_lua_reloads",
    "connmix_build_info",
}


class Scrape:
    """The samples of one scrape, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, name: str, **labels: str) -> bool:
        return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
                   for s in self.samples)


async def scrape(port: int, headers: dict[str, str] | None = None) -> Scrape:
    response = await http_request(port, "GET", "/metrics", headers=headers)
    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.body.decode())


@in_asyncio
async def test_engine_metrics_move_with_traffic() -> None:
    running = await start_engine(loopback_config())
    try:
        before = await scrape(running.api_port)
        assert ENGINE_NAMES <= set(before.families)
        assert before.value("connmix_build_info") == 1
        assert before.value("connmix_engine_servers_clients", protocol="websocket") == 0

        async with websockets.connect(running.client_url) as client, \
                websockets.connect(running.api_url) as api:
            await client.send("one")
            await client.send("two")
            assert (await api_call(api, "queue.consume", ["foo"]))["result"] == {"success": True}
            events = [json.loads(await asyncio.wait_for(api.recv(), 5)) for _ in range(2)]
            client_id = events[0]["result"]["client_id"]
            reply = await api_call(api, "mesh.send", [{"client_id": client_id, "data": "hello"}], 2)
            assert reply["error"] is None
            assert await asyncio.wait_for(client.recv(), 5) == "hello"
            bad = await api_call(api, "mesh.send", [{"client_id": "1", "data": "x"}], 3)
            assert bad["error"]["code"] == 401
            await api.send("not json")
            await asyncio.wait_for(api.recv(), 5)
            http = await post(running.api_port, "/v1/mesh/publish", {"c": "nobody", "d": "x"})
            assert http.status == 200

            during = await scrape(running.api_port)
            assert during.value("connmix_engine_servers_clients", protocol="websocket") == 1
            assert during.has("connmix_engine_servers_clients", protocol="websocket",
                              port=str(running.service.engine.protocol_listeners[0].actual_port))
            assert during.value("connmix_engine_api_connections") == 1
            assert during.value("connmix_engine_queue_consumers", topic="foo") == 1
            assert during.value("connmix_engine_queue_length", topic="foo") == 0

        after = await scrape(running.api_port)
        assert after.value("connmix_engine_servers_read_messages_total", protocol="websocket") == 2
        assert after.value("connmix_engine_servers_send_messages_total", protocol="websocket") == 1
        assert after.value("connmix_engine_queue_push_total", topic="foo", result="ok") == 2
        assert after.value("connmix_engine_queue_delivered_total", topic="foo") == 2
        assert after.value("connmix_engine_api_requests_total", method="queue.consume", code="0") == 1
        assert after.value("connmix_engine_api_requests_total", method="mesh.send", code="0") == 1
        assert after.value("connmix_engine_api_requests_total", method="mesh.send", code="401") == 1
        assert after.value("connmix_engine_api_requests_total", method="", code="-32700") == 1
        assert after.value("connmix_engine_api_requests_total", method="mesh.publish", code="0") == 1
        assert after.value("connmix_engine_servers_send_duration_seconds_count",
                           protocol="websocket", scenario="local") == 1
        assert after.value("connmix_engine_servers_clients", protocol="websocket") == 0
    finally:
        await running.stop()


@in_asyncio
async def test_center_metrics_count_engines_and_clients() -> None:
    running = await start_engine(loopback_config())
    try:
        center = await scrape(running.center_api_port)
        assert center.value("connmix_center_registry_engine_nodes") == 1
        assert center.has("connmix_center_registry_clients")
        assert center.has("connmix_center_registry_channels_total")
        assert center.value("connmix_build_info") == 1
        assert not center.has("connmix_engine_channels")  # the center API shows the center's names
        async with websockets.connect(running.client_url):
            await asyncio.sleep(0.1)
            registry = running.service.center.registry
            registry.heartbeat(running.service.engine.node_id, {"clients": 1, "channels": 3})
            center = await scrape(running.center_api_port)
        assert center.value("connmix_center_registry_clients") == 1
        assert center.value("connmix_center_registry_channels_total") == 3
    finally:
        await running.stop()


@in_asyncio
async def test_two_trees_in_one_process_have_their_own_registries() -> None:
    first = await start_engine(loopback_config())
    second = await start_engine(loopback_config())
    try:
        async with websockets.connect(first.client_url) as client:
            await client.send("x")
            await asyncio.sleep(0.2)
        one, two = await scrape(first.api_port), await scrape(second.api_port)
        assert one.value("connmix_engine_servers_read_messages_total") == 1
        assert two.value("connmix_engine_servers_read_messages_total") == 0
    finally:
        await first.stop()
        await second.stop()


@in_asyncio
async def test_metrics_need_the_read_role_and_get() -> None:
    import dataclasses

    from connmix_tx.config import AccessConfig, UserConfig

    reader = UserConfig("reader", "pw", ("read",), "*")
    config = dataclasses.replace(loopback_config(), access=AccessConfig((reader,), True))
    running = await start_engine(config)
    try:
        assert (await http_request(running.api_port, "GET", "/metrics")).status == 401
        assert (await http_request(running.center_api_port, "GET", "/metrics")).status == 401
        await scrape(running.api_port, basic(reader))
        await scrape(running.center_api_port, basic(reader))
        response = await http_request(running.api_port, "POST", "/metrics", b"", basic(reader))
        assert response.status == 405
    finally:
        await running.stop()


# Unit tests ---------------------------------------------------------------------------------


def test_queue_push_results_and_bounded_topic_labels() -> None:
    from twisted.internet.task import Clock

    from connmix_tx.engine.queue import QueueError

    from connmix_tx.engine.queue import QueueManager

    metrics = EngineMeter()
    queues = QueueManager(Clock(), topic_size=1, max_topics=1, meter=metrics)
    queues.push("a", "1", b"{}")
    for topic in ("a", "b", "bad topic"):
        with pytest.raises(QueueError):
            queues.push(topic, "1", b"{}")
    text = Scrape(_text(metrics))
    assert text.value("connmix_engine_queue_push_total", topic="a", result="ok") == 1
    assert text.value("connmix_engine_queue_push_total", topic="a", result="full") == 1
    assert text.value("connmix_engine_queue_push_total", topic="", result="error") == 2
    assert not text.has("connmix_engine_queue_push_total", topic="b")


def test_lua_errors_and_reloads_are_counted_per_entry() -> None:
    metrics = EngineMeter()
    meter: ServerMeter = metrics.server("websocket", "lua/entry.websocket.lua")
    meter.lua_error("on_message", "boom")
    meter.lua_error("on_message")
    metrics.reloaded("lua/entry.websocket.lua", ok=False)
    text = Scrape(_text(metrics))
    assert text.value("connmix_engine_lua_errors_total", entry="lua/entry.websocket.lua",
                      callback="on_message") == 2
    assert text.value("connmix_engine_lua_reloads_total", result="failed") == 1


def test_the_null_meter_takes_every_call_a_server_makes_and_keeps_nothing() -> None:
    """Plain classes built without metrics (unit tests, tools) count into the ``NullMeter``: it
    offers each counter of a server's real meter with the same methods, and ``lua_error`` with its
    signature, and keeps nothing."""
    real = EngineMeter().server("websocket", "lua/entry.websocket.lua")
    null = NullMeter()
    counters = [name for name in ServerCounts.__slots__ if not name.startswith("_")]
    assert counters == ["read", "sent", "errors", "slow", "local_send"]
    for name in counters:
        methods = [m for m in ("inc", "observe") if hasattr(getattr(real, name), m)]
        assert methods, name
        for method in methods:
            assert getattr(getattr(null, name), method)(1) is None
    assert inspect.signature(NullMeter.lua_error) == inspect.signature(ServerCounts.lua_error)
    assert null.lua_error("on_message", "boom") is None
    assert vars(null) == {}  # nothing was kept


def _text(metrics: EngineMeter) -> str:
    return exposition([metrics.snapshot()]).decode()


def test_hot_reloads_are_counted_ok_and_failed_once_per_broken_version(tmp_path: Any) -> None:
    import os

    from twisted.internet.task import Clock

    from connmix_tx.lua.reload import HotReloader
    from connmix_tx.lua.runtime import Script

    entry = tmp_path / "lua" / "entry.lua"
    entry.parent.mkdir()
    body = "function on_handshake() end\nfunction on_message(m) end\nfunction on_close() end\n"
    entry.write_text(body)
    script = Script(str(entry), "websocket", {}, Clock())
    script.load()
    metrics = EngineMeter()
    reloader = HotReloader(script, Clock(), 1, meter=metrics)

    def rewrite(text: str, stamp: int) -> None:
        entry.write_text(text)
        os.utime(entry, (stamp, stamp))

    rewrite(body + "-- changed\n", 1_000_000)
    assert reloader.check()
    rewrite("function broken(", 2_000_000)
    assert not reloader.check()
    assert not reloader.check()  # the same broken version is not retried, nor counted again
    text = Scrape(_text(metrics))
    assert text.value("connmix_engine_lua_reloads_total", entry=reloader.entry, result="ok") == 1
    assert text.value("connmix_engine_lua_reloads_total", entry=reloader.entry, result="failed") == 1


def test_the_metrics_rooms_import_nothing_they_measure_and_patch_nothing() -> None:
    """The meter seam: connmix_tx.meter, .tally and .metrics import nothing from the engine or the
    Lua layer, and importing them leaves prometheus_client's own value class alone."""
    import ast
    from pathlib import Path

    from prometheus_client import values

    import connmix_tx.metrics  # noqa: F401 - imported for its (absent) side effects

    root = Path(__file__).resolve().parent.parent / "connmix_tx"
    for name in ("meter.py", "tally.py", "metrics.py"):
        tree = ast.parse((root / name).read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith(("connmix_tx.engine", "connmix_tx.lua"))], name
    assert values.ValueClass.__module__ == "prometheus_client.values"
    assert values.ValueClass.__name__ == "MutexValue"
