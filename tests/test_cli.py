"""``connmix-cli`` (connmix_tx.cli) as a subprocess against a real in-process engine.

The engine runs in this process on the asyncio reactor, so the CLI is started with asyncio's
subprocess API (a blocking ``subprocess.run`` would stall the engine it talks to).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest
import websockets

from conftest import REPO, in_asyncio, loopback_config, start_engine, with_users
from connmix_tx.cli import event_line, json_arg, nodes_table
from connmix_tx.client import QueueMessage
from netclients import api_call


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run ``python -m connmix_tx.cli ARGS``; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connmix_tx.cli", *args, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def client_id_of(engine: Any, ws: Any) -> str:
    """The client id of ``ws``, learnt by consuming its first message (then unconsuming)."""
    async with websockets.connect(engine.api_url) as api:
        await api_call(api, "queue.consume", ["foo"])
        await ws.send("whoami")
        event = json.loads(await asyncio.wait_for(api.recv(), 5))
        return event["result"]["client_id"]


def engine_args(engine: Any) -> list[str]:
    return ["--engine", engine.api_url]


# --------------------------------------------------------------------------- output helpers


def test_nodes_table_aligns_columns() -> None:
    nodes = [
        {"id": "c8u7jfbin5659oh0b13g", "number": 0, "api_server": "127.0.0.1:6789", "mesh_point": "127.0.0.1:6788",
         "host": "127.0.0.1", "version": "0.1.0", "clients": 12, "channels": 3, "last_seen": 995},
        {"id": "c8u7jfbin5659oh0b140", "number": 1, "api_server": "10.0.0.2:6789", "mesh_point": "10.0.0.2:6788",
         "host": "10.0.0.2", "version": "0.1.0", "clients": 0, "channels": 0, "last_seen": 1000},
    ]
    lines = nodes_table(nodes, now=1000).splitlines()
    assert lines[0].split("  ")[0] == "NUMBER"
    assert lines[1].split() == ["0", "c8u7jfbin5659oh0b13g", "127.0.0.1:6789", "127.0.0.1:6788", "127.0.0.1",
                                "0.1.0", "12", "3", "5s", "ago"]
    assert lines[0].index("API SERVER") == lines[1].index("127.0.0.1:6789") == lines[2].index("10.0.0.2:6789")
    assert nodes_table([], now=0) == "no engine registered"


def test_call_arguments_are_json_or_text() -> None:
    assert [json_arg(a) for a in ("7", '{"a":1}', "null", "room1", '"quoted"')] == [7, {"a": 1}, None, "room1", "quoted"]


def test_event_lines() -> None:
    message = QueueMessage("1463819408261513216", "n1", "foo", {"msg": "é", "ctx": []}, "127.0.0.1:6789")
    assert event_line(message, False) == '1463819408261513216 foo {"ctx":[],"msg":"é"}'
    assert json.loads(event_line(message, True)) == {
        "client_id": "1463819408261513216", "node_id": "n1", "topic": "foo", "data": {"msg": "é", "ctx": []}
    }
    assert event_line(QueueMessage("", "n1", "foo", 1, "e"), False) == "- foo 1"


# --------------------------------------------------------------------------- against a real engine


@in_asyncio
async def test_ping_through_the_engine_and_through_the_center(engine: Any) -> None:
    code, out, err = await cli(*engine_args(engine), "ping")
    assert (code, err) == (0, "")
    assert out.startswith(f"127.0.0.1:{engine.api_port}: pong in ") and out.endswith(" ms\n")
    code, out, err = await cli("--center", f"http://127.0.0.1:{engine.center_api_port}", "ping")
    assert (code, err) == (0, "")
    assert out.startswith(f"127.0.0.1:{engine.api_port} (node 0): pong in ")


@in_asyncio
async def test_nodes(engine: Any) -> None:
    code, out, err = await cli("--center", f"http://127.0.0.1:{engine.center_api_port}", "nodes")
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert header.split()[:3] == ["NUMBER", "ID", "API"]
    cells = row.split()
    assert cells[0] == "0" and len(cells[1]) == 20 and cells[2] == f"127.0.0.1:{engine.api_port}"
    code, out, err = await cli(*engine_args(engine), "nodes")
    assert code == 1 and err == "connmix-cli: nodes needs the center (--center URL)\n"


@in_asyncio
async def test_send_call_and_publish(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as ws:
        client_id = await client_id_of(engine, ws)
        code, out, err = await cli(*engine_args(engine), "send", client_id, "hello from the cli")
        assert (code, out, err) == (0, f"sent to {client_id} (total 1, fail 0)\n", "")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello from the cli"

        code, out, _ = await cli(*engine_args(engine), "send", client_id, "AAH/", "--binary")
        assert code == 0
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01\xff"

        code, out, err = await cli(*engine_args(engine), "call", client_id, "subscribe", "room1", "room2")
        assert (code, out, err) == (0, f"subscribe on {client_id}: ok\n", "")
        code, out, err = await cli(*engine_args(engine), "publish", "room2", "to the room")
        assert (code, out, err) == (0, "published to room2: 1 reached, 0 failed\n", "")
        assert await asyncio.wait_for(ws.recv(), 5) == "to the room"

        # JSON arguments: the value 7 arrives as a number in the context.
        code, _, _ = await cli(*engine_args(engine), "call", client_id, "set_context_value", "level", "7")
        assert code == 0
        async with websockets.connect(engine.api_url) as api:
            await api_call(api, "queue.consume", ["foo"])
            await ws.send("context?")
            event = json.loads(await asyncio.wait_for(api.recv(), 5))
            assert event["result"]["data"]["ctx"]["level"] == 7


@in_asyncio
async def test_api_errors_are_one_line_and_exit_1(engine: Any) -> None:
    code, out, err = await cli(*engine_args(engine), "send", "1463819408261513216", "x")
    assert (code, out) == (1, "")
    assert err.startswith("connmix-cli: API error 401: ") and err.count("\n") == 1
    code, _, err = await cli(*engine_args(engine), "call", "1463819408261513216", "nonsense")
    assert code == 1 and err.startswith("connmix-cli: API error 101: ") and err.count("\n") == 1
    code, _, err = await cli(*engine_args(engine), "send", "1", "not base64!", "--binary")
    assert code == 1 and err == "connmix-cli: --binary needs base64 DATA, got 'not base64!'\n"


@in_asyncio
async def test_consume_prints_one_line_per_message(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as ws:
        client_id = await client_id_of(engine, ws)
        # Pushed before anyone consumes: the messages wait in the queue for the CLI.
        await ws.send("first")
        await ws.send("second")
        await asyncio.sleep(0.05)
        code, out, err = await cli("--center", f"http://127.0.0.1:{engine.center_api_port}",
                                   "consume", "foo", "--count", "2")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ("first", "second")):
        sender, topic, data = line.split(" ", 2)
        assert (sender, topic) == (client_id, "foo")
        assert json.loads(data)["msg"]["data"] == text


@in_asyncio
async def test_consume_as_json(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as ws:
        await ws.send("as json")
        await asyncio.sleep(0.05)
        code, out, _ = await cli(*engine_args(engine), "consume", "foo", "--count", "1", "--json")
    assert code == 0
    event = json.loads(out)
    assert event["topic"] == "foo" and event["data"]["msg"]["data"] == "as json" and len(event["node_id"]) == 20


@in_asyncio
async def test_unreachable_nodes_are_one_clear_line(free_port: Any) -> None:
    port = free_port()
    code, out, err = await cli("--engine", f"ws://127.0.0.1:{port}/ws/v1", "ping")
    assert (code, out, err) == (1, "", f"connmix-cli: engine 127.0.0.1:{port} unreachable: connection refused\n")
    code, out, err = await cli("--center", f"http://127.0.0.1:{port}", "nodes")
    assert (code, out, err) == (1, "", f"connmix-cli: center http://127.0.0.1:{port} unreachable: connection refused\n")
    code, out, err = await cli("--center", f"http://127.0.0.1:{port}", "send", "1", "x")
    assert (code, out, err) == (1, "", f"connmix-cli: center http://127.0.0.1:{port} unreachable: connection refused\n")


@in_asyncio
async def test_credentials() -> None:
    running = await start_engine(with_users(loopback_config()))
    center = f"http://127.0.0.1:{running.center_api_port}"
    try:
        code, _, err = await cli("--center", center, "nodes")
        assert code == 1 and err == f"connmix-cli: center {center} answered HTTP 401: unauthorized\n"
        code, _, err = await cli("--engine", running.api_url, "--user", "alice", "--password", "wrong", "ping")
        assert code == 1
        assert err == f"connmix-cli: engine 127.0.0.1:{running.api_port} unreachable: handshake refused: HTTP 401 Unauthorized\n"
        code, out, err = await cli("--center", center, "--user", "alice", "ping", env={"CONNMIX_PASSWORD": "s3cret"})
        assert (code, err) == (0, "") and "pong in" in out
        code, out, _ = await cli("--center", center, "--user", "alice", "--password", "s3cret", "nodes")
        assert code == 0 and out.startswith("NUMBER")
    finally:
        await running.stop()


@in_asyncio
async def test_consume_ack_manual_acknowledges_what_it_printed(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as ws:
        for text in ("one", "two", "three"):
            await ws.send(text)
        await asyncio.sleep(0.05)
        code, out, err = await cli(*engine_args(engine), "consume", "foo", "--count", "2", "--ack", "manual",
                                   "--json")
        assert (code, err) == (0, "")
        printed = [json.loads(line) for line in out.splitlines()]
        assert [p["data"]["msg"]["data"] for p in printed] == ["one", "two"]
        assert all(p["message_id"] and p["redelivered"] == 0 for p in printed)
        # "three" reached the CLI unacknowledged (or not at all): the next consumer gets it, and
        # only it -- the printed ones were acknowledged before the CLI exited.
        async with websockets.connect(engine.api_url) as api:
            await api_call(api, "queue.consume", ["foo"])
            event = json.loads(await asyncio.wait_for(api.recv(), 5))
            assert event["result"]["data"]["msg"]["data"] == "three"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(api.recv(), 0.5)
