"""Hostile clients against a real engine process (issue 11): nothing a client does alone may
freeze, crash or bloat a node.

One ``twistd connmix --dev`` process (users mode: ``alice`` may use the API) serves every case,
one after the other: ping floods that never read (protocol port and API port), endless handshake
headers, huge and chunked HTTP bodies with and without credentials, pipelined upgrade requests
while ``on_handshake`` waits, a reader that never reads, slowloris handshakes.  After each case
the node must still serve a normal client (the walkthrough's push / consume / mesh.send round
trip through ``/ws/v1``) and its RSS (``/proc/<pid>/status``) must not have grown by more than
``RSS_BOUND``.  The attackers are raw sockets; the well-behaved clients use ``websockets``.
Bounded: every attack stops after a byte budget or a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Iterator

import pytest
import websockets

from conftest import in_asyncio
from netclients import connect, masked_frame, read_all, read_head, upgrade_request
from procs import Process, free_ports, twistd, write_yaml

RSS_BOUND = 50 << 20
PING = 9
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()
ECHO = """
function on_handshake(client_id, headers, server)
  -- Waits (like a script asking another service) before it admits the client.
  mix.websocket():wait_context_value("never", 0.3)
end
function on_message(msg) mix.websocket():send(msg.data) end
function on_close(client_id, err) end
"""

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")


class Node:
    """The engine process and its ports."""

    def __init__(self, process: Process, ports: dict[str, int]) -> None:
        self.process = process
        self.ports = ports

    def rss(self) -> int:
        """The process's resident set size in bytes."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("hostile")
    ports = dict(zip(("registry", "center_api", "mesh", "api", "client", "echo"), free_ports(6)))
    (tmp / "echo.lua").write_text(ECHO)
    config = write_yaml(tmp / "node.yaml", {
        "access": {"protected": True,
                   "users": [{"username": "alice", "password": "s3cret", "roles": ["read", "write"]}]},
        "center": {
            "registry": {"bind": "127.0.0.1", "port": ports["registry"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["center_api"]},
        },
        "engine": {
            "meshPoint": {"bind": "127.0.0.1", "port": ports["mesh"]},
            "apiServer": {"bind": "127.0.0.1", "port": ports["api"]},
            "servers": [
                {"bind": "127.0.0.1", "port": ports["client"]},
                {"bind": "127.0.0.1", "port": ports["echo"], "entry": str(tmp / "echo.lua")},
            ],
        },
    })
    process = Process(twistd("--dev", "-f", str(config)), tmp)
    try:
        process.wait_for_line(rf"start the protocol server .*:{ports['echo']}\)")
        yield Node(process, ports)
    finally:
        code = process.stop()
        text = "\n".join(process.lines)
        assert "Traceback" not in text, text[-5000:]
        assert "Unhandled" not in text, text[-5000:]
        assert code == 0, text[-5000:]


# Attacker tools -------------------------------------------------------------------------------


async def send(sock: socket.socket, data: bytes, timeout: float = 2.0) -> bool:
    """Write ``data``; False once the peer is gone or stopped taking bytes for ``timeout``."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    return True


async def flood(sock: socket.socket, frame: bytes, budget: int) -> int:
    """Write ``frame`` over and over, never reading, until ``budget`` bytes or the engine stops
    taking them; return the bytes written."""
    batch = frame * (65536 // len(frame))
    sent = 0
    while sent < budget and await send(sock, batch):
        sent += len(batch)
    return sent


# The well-behaved client ------------------------------------------------------------------


async def round_trip(node: Node) -> None:
    """The walkthrough: a client's message reaches a ``/ws/v1`` consumer, whose ``mesh.send``
    answer reaches the client; and the echo server answers."""
    marker = base64.b16encode(os.urandom(6)).decode()
    async with websockets.connect(f"ws://127.0.0.1:{node.ports['client']}", open_timeout=5) as client, \
            websockets.connect(f"ws://127.0.0.1:{node.ports['api']}/ws/v1", open_timeout=5,
                               additional_headers={"Authorization": BASIC}) as api:
        await api.send(json.dumps({"method": "queue.consume", "params": ["foo"], "id": "c"}))
        assert json.loads(await asyncio.wait_for(api.recv(), 5))["result"] == {"success": True}
        await client.send(marker)
        while True:
            event = json.loads(await asyncio.wait_for(api.recv(), 5))
            if event.get("event") == "queue.consume" and event["result"]["data"]["msg"]["data"] == marker:
                break
        send_params = {"client_id": event["result"]["client_id"], "data": "re:" + marker}
        await api.send(json.dumps({"method": "mesh.send", "params": [send_params], "id": "s"}))
        assert await asyncio.wait_for(client.recv(), 5) == "re:" + marker
    async with websockets.connect(f"ws://127.0.0.1:{node.ports['echo']}", open_timeout=5) as echo:
        await echo.send(marker)
        assert await asyncio.wait_for(echo.recv(), 5) == marker


async def survived(node: Node, before: int) -> None:
    """The liveness check and the RSS bound after a case."""
    await round_trip(node)
    grown = node.rss() - before
    print(f"RSS growth {grown / 2**20:.1f} MiB")
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB"


# The cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["client", "api"])
@in_asyncio
async def test_ping_flood_never_reading(node: Node, where: str) -> None:
    await round_trip(node)  # warm: first connections allocate once
    before = node.rss()
    port = node.ports[where]
    path, extra = ("/ws/v1", f"Authorization: {BASIC}\r\n") if where == "api" else ("/", "")
    socks = []
    for _ in range(2):
        sock = await connect(port, rcvbuf=4096)
        await send(sock, upgrade_request(port, path, extra))
        assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
        socks.append(sock)
    sent = [await flood(sock, masked_frame(b"p" * 125, PING), 80 << 20) for sock in socks]
    print(f"pings written before the engine stopped taking them: {sent}")
    for sock in socks:
        sock.close()
    await survived(node, before)


@pytest.mark.parametrize("where", ["client", "api"])
@in_asyncio
async def test_endless_handshake_headers(node: Node, where: str) -> None:
    await round_trip(node)
    before = node.rss()
    port = node.ports[where]
    socks = [await connect(port) for _ in range(10)]
    line = b"X-Filler: " + b"a" * 4000 + b"\r\n"
    answers = []
    for sock in socks:
        await send(sock, b"GET / HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        while sent < 32 << 20 and await send(sock, line * 16):
            sent += len(line) * 16
        # What was written after the refusal sits in kernel buffers until the close.
        assert sent < 32 << 20, "the engine kept reading header lines"
        answers.append(await read_all(sock, 3))
        sock.close()
    assert all(a.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")) for a in answers), answers[0][:200]
    await survived(node, before)


@pytest.mark.parametrize("credentials", [None, BASIC])
@in_asyncio
async def test_huge_and_chunked_http_bodies(node: Node, credentials: str | None) -> None:
    await round_trip(node)
    before = node.rss()
    port = node.ports["api"]
    head = b"POST /v1/mesh/send HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    if credentials:
        head += f"authorization: {credentials}\r\n".encode()
    for _ in range(5):
        sock = await connect(port)
        await send(sock, head + b"content-length: 1073741824\r\n\r\n")
        sent = 0
        while sent < 64 << 20 and await send(sock, b"x" * 65536, timeout=1):
            sent += 65536
        assert (await read_all(sock, 3)).startswith(b"HTTP/1.1 413 ")
        sock.close()
        sock = await connect(port)
        await send(sock, head + b"transfer-encoding: chunked\r\n\r\n")
        piece = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        sent = 0
        while sent < 64 << 20 and await send(sock, piece, timeout=1):
            sent += len(piece)
        assert sent < 16 << 20, "the engine kept reading the chunked body"
        assert (await read_all(sock, 3)).startswith(b"HTTP/1.1 413 ")
        sock.close()
    await survived(node, before)


@in_asyncio
async def test_pipelined_handshakes(node: Node) -> None:
    await round_trip(node)
    before = node.rss()
    port = node.ports["echo"]
    for together in (True, False):
        sock = await connect(port)
        requests = [upgrade_request(port) for _ in range(5)]
        if together:
            await send(sock, b"".join(requests))
        else:
            for request in requests:
                await send(sock, request)
                await asyncio.sleep(0.02)
        answer = await read_all(sock, 3)
        assert answer.count(b"HTTP/1.1 101") == 1, answer[:500]
        sock.close()
    await survived(node, before)


@pytest.mark.parametrize("where", ["echo", "api"])
@in_asyncio
async def test_reader_that_never_reads(node: Node, where: str) -> None:
    await round_trip(node)
    before = node.rss()
    port = node.ports[where]
    sock = await connect(port, rcvbuf=4096)
    if where == "api":
        await send(sock, upgrade_request(port, "/ws/v1", f"Authorization: {BASIC}\r\n"))
        request = json.dumps({"method": "server.ping", "params": [], "id": "i" * 8000}).encode()
        frame = masked_frame(request)
    else:
        await send(sock, upgrade_request(port))
        frame = masked_frame(b"e" * 8000, 2)
    assert (await read_head(sock)).startswith(b"HTTP/1.1 101")
    sent = await flood(sock, frame, 80 << 20)
    assert sent < 80 << 20, "the engine kept answering a peer that reads nothing"
    sock.close()
    await survived(node, before)


@in_asyncio
async def test_slowloris_handshakes_do_not_block_others(node: Node) -> None:
    await round_trip(node)
    before = node.rss()
    socks = []
    for port in (node.ports["client"], node.ports["echo"], node.ports["api"]):
        for _ in range(30):
            sock = await connect(port)
            await send(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
    for _ in range(3):
        for sock in socks:
            await send(sock, b"a")
        await round_trip(node)  # served while the slow handshakes hang around
        await asyncio.sleep(0.2)
    for sock in socks:
        sock.close()
    await survived(node, before)
