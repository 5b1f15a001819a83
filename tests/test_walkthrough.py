"""The README walkthrough and every long-form API method, against the real service tree.

Each test talks to a dev-mode engine on loopback ports with the independent ``websockets``
client, exactly as a user with a browser WebSocket tool would.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

from conftest import in_asyncio, loopback_config, start_engine
from netclients import next_event

SEED_CONSUME = '{"method":"queue.consume","params":["foo"],"id":12345}'


async def call(api: Any, method: str, params: list, request_id: Any = 1) -> dict:
    await api.send(json.dumps({"method": method, "params": params, "id": request_id}))
    return json.loads(await asyncio.wait_for(api.recv(), 5))


@in_asyncio
async def test_seed_walkthrough_push_first_then_consume(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as client, \
            websockets.connect(engine.api_url) as api:
        await client.send("test")
        await asyncio.sleep(0.05)  # the message waits in the queue: nobody consumes yet
        await api.send(SEED_CONSUME)
        assert json.loads(await api.recv()) == {"error": None, "result": {"success": True}, "id": 12345}
        event = await next_event(api)
        assert event["event"] == "queue.consume" and event["id"] is None
        result = event["result"]
        assert result["queue"] == "foo"
        assert result["data"]["msg"] == {"data": "test", "finish": True, "type": "text"}
        headers = result["data"]["ctx"]["headers"]
        assert headers["host"] == engine.client_url.removeprefix("ws://")
        assert headers["upgrade"] == "websocket"
        assert len(result["client_id"]) == 19 and result["client_id"].isdigit()
        assert len(result["node_id"]) == 20

        send = {"client_id": result["client_id"], "data": "hello, world!"}
        await api.send(json.dumps({"method": "mesh.send", "params": [send], "id": 12345}))
        assert json.loads(await api.recv()) == {
            "error": None, "result": {"fail": 0, "success": True, "total": 1}, "id": 12345
        }
        assert await asyncio.wait_for(client.recv(), 5) == "hello, world!"

        # Further messages arrive at the consumer by themselves.
        await client.send("again")
        assert (await next_event(api))["result"]["data"]["msg"]["data"] == "again"


@in_asyncio
async def test_consume_first_then_push(engine: Any) -> None:
    async with websockets.connect(engine.api_url) as api:
        assert (await call(api, "queue.consume", ["foo"]))["result"] == {"success": True}
        async with websockets.connect(engine.client_url) as client:
            await client.send("first")
            await client.send(b"\x00\xff")
            first, second = await next_event(api), await next_event(api)
        assert first["result"]["data"]["msg"]["data"] == "first"
        # Binary frames reach the consumer base64-encoded (docs/lua-api.md, "Shipped scripts").
        assert second["result"]["data"]["msg"] == {"data": "AP8=", "finish": True, "type": "binary"}


@in_asyncio
async def test_competing_consumers_share_messages_exactly_once(engine: Any) -> None:
    async with websockets.connect(engine.api_url) as a, websockets.connect(engine.api_url) as b:
        await call(a, "queue.consume", ["foo"])
        await call(b, "queue.consume", ["foo"])
        async with websockets.connect(engine.client_url) as client:
            for i in range(10):
                await client.send(f"m{i}")
            seen = [await next_event(a) for _ in range(5)] + [await next_event(b) for _ in range(5)]
        texts = sorted(e["result"]["data"]["msg"]["data"] for e in seen)
        assert texts == sorted(f"m{i}" for i in range(10))


@in_asyncio
async def test_conn_call_context_and_subscriptions(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as client, websockets.connect(engine.api_url) as api:
        await call(api, "queue.consume", ["foo"])
        await client.send("hi")
        client_id = (await next_event(api))["result"]["client_id"]

        spec = {"client_id": client_id, "func": "set_context_value", "args": ["user_id", 10000]}
        assert await call(api, "conn.call", [spec], 12345) == {
            "error": None, "result": {"success": True}, "id": 12345
        }
        spec = {"client_id": int(client_id), "func": "set_context", "args": [{"room": "a", "x": 1}]}
        assert (await call(api, "conn.call", [spec]))["result"] == {"success": True}
        await client.send("after context")
        ctx = (await next_event(api))["result"]["data"]["ctx"]
        assert ctx["user_id"] == 10000 and ctx["room"] == "a" and ctx["x"] == 1 and "headers" in ctx

        spec = {"client_id": client_id, "func": "subscribe", "args": ["channel1", "channel2"]}
        assert (await call(api, "conn.call", [spec]))["result"] == {"success": True}
        published = await call(api, "mesh.publish", [{"channel": "channel1", "data": "to all"}])
        assert published["result"] == {"fail": 0, "success": True, "total": 1}
        assert await asyncio.wait_for(client.recv(), 5) == "to all"

        spec = {"client_id": client_id, "func": "unsubscribe", "args": ["channel1"]}
        assert (await call(api, "conn.call", [spec]))["result"] == {"success": True}
        published = await call(api, "mesh.publish", [{"channel": "channel1", "data": "nobody"}])
        assert published["result"] == {"fail": 0, "success": True, "total": 0}


@in_asyncio
async def test_every_error_code_of_the_long_form(engine: Any) -> None:
    async with websockets.connect(engine.api_url) as api:
        assert await call(api, "server.ping", [], 12345) == {
            "error": None, "result": {"status": "server.pong"}, "id": 12345
        }

        async def code(method: str, params: list) -> int:
            reply = await call(api, method, params)
            assert "result" not in reply
            return reply["error"]["code"]

        assert await code("queue.consume", []) == 101
        assert await code("queue.consume", [42]) == 101
        assert await code("queue.unconsume", []) == 203
        await call(api, "queue.consume", ["foo"])
        assert await code("queue.consume", ["foo"]) == 202
        missing = "1463819408261513216"
        assert await code("conn.call", [{"client_id": "abc", "func": "subscribe", "args": ["c"]}]) == 101
        assert await code("conn.call", [{"client_id": missing, "func": "nope", "args": []}]) == 101
        assert await code("conn.call", [{"client_id": missing, "func": "subscribe", "args": ["c"]}]) == 301
        assert await code("mesh.send", [{"client_id": missing}]) == 101
        assert await code("mesh.send", [{"client_id": missing, "data": "x"}]) == 401
        assert await code("mesh.publish", [{"channel": "has space", "data": "x"}]) == 101
        assert await code("no.such", []) == -32601

        # Malformed JSON gets an error reply and the connection stays usable.
        await api.send("{not json")
        assert json.loads(await api.recv())["error"]["code"] == -32700
        assert (await call(api, "server.ping", []))["result"] == {"status": "server.pong"}


@in_asyncio
async def test_too_many_topics_is_201() -> None:
    config = loopback_config()
    import dataclasses

    luavm = dataclasses.replace(
        config.engine.luavm, queue=dataclasses.replace(config.engine.luavm.queue, max_topics=1)
    )
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, luavm=luavm))
    running = await start_engine(config)
    try:
        async with websockets.connect(running.api_url) as api:
            reply = await call(api, "queue.consume", ["a", "b"])
            assert reply["error"]["code"] == 201
    finally:
        await running.stop()


@in_asyncio
async def test_send_to_a_client_that_left_is_401(engine: Any) -> None:
    async with websockets.connect(engine.api_url) as api:
        await call(api, "queue.consume", ["foo"])
        async with websockets.connect(engine.client_url) as client:
            await client.send("bye")
            client_id = (await next_event(api))["result"]["client_id"]
        await asyncio.sleep(0.1)
        reply = await call(api, "mesh.send", [{"client_id": client_id, "data": "late"}], 12345)
        assert reply["error"]["code"] == 401 and reply["id"] == 12345


@in_asyncio
async def test_idle_client_is_closed_after_read_timeout() -> None:
    running = await start_engine(loopback_config(read_timeout=1))
    try:
        loop = asyncio.get_running_loop()
        async with websockets.connect(running.client_url, ping_interval=None) as client:
            opened = loop.time()
            await asyncio.wait_for(client.wait_closed(), 5)
            elapsed = loop.time() - opened
        assert client.close_code == 1000 and client.close_reason == "read timeout"
        assert 1.0 <= elapsed <= 2.5
    finally:
        await running.stop()


@in_asyncio
async def test_unknown_path_on_api_port_is_json_404(engine: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.api_port)
    writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response.startswith(b"HTTP/1.1 404")
    assert response.endswith(b'{"E":{"c":-32601,"m":"not found"},"r":null}')


@in_asyncio
async def test_clean_stop_closes_clients_with_going_away() -> None:
    running = await start_engine(loopback_config())
    async with websockets.connect(running.client_url) as client:
        await client.send("hello")
        await running.stop()
        await asyncio.wait_for(client.wait_closed(), 5)
    assert client.close_code == 1001
