"""Independent clients for integration tests: plain HTTP, API requests over a ``websockets``
connection, a raw WebSocket that never reads, and a bounded wait.

``http_request`` speaks HTTP/1.1 with ``http.client`` in a worker thread (so it never shares code
with the server); ``raw_handshake`` completes a WebSocket handshake on a bare socket with a small
receive buffer and then reads nothing: a client that "never reads".
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import socket
from typing import Any

from connmix_tx.config import UserConfig

#: Users for protected-mode tests (roles and allowed addresses differ).
ALICE = UserConfig("alice", "s3cret", ("read", "write"), "*")
BOB = UserConfig("bob", "reader", ("read",), "127.0.0.*")
CAROL = UserConfig("carol", "carol-pw", ("read", "write"), "10.*")



class Response:
    """Status, headers (case-insensitive) and body of one HTTP response."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


async def http_request(port: int, method: str, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> Response:
    def run() -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Response(response.status, response.headers, response.read())  # case-insensitive
        finally:
            conn.close()

    return await asyncio.get_running_loop().run_in_executor(None, run)


async def post(port: int, path: str, body: Any, headers: dict[str, str] | None = None) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http_request(port, "POST", path, raw, headers)


def basic(user: UserConfig, password: str | None = None) -> dict[str, str]:
    """The Basic ``Authorization`` header of ``user`` (with another ``password`` if given)."""
    token = base64.b64encode(f"{user.username}:{password or user.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def api_call(api: Any, method: str, params: Any, request_id: Any = 1) -> dict:
    """One long-form request on the ``websockets`` connection ``api``; its decoded reply."""
    await api.send(json.dumps({"method": method, "params": params, "id": request_id}))
    return json.loads(await asyncio.wait_for(api.recv(), 5))


async def compact_call(api: Any, method: str, p: Any, request_id: Any = 1) -> dict:
    """One compact request (``m`` / ``p`` / ``i``) on ``api``; its decoded reply."""
    await api.send(json.dumps({"m": method, "p": p, "i": request_id}))
    return json.loads(await asyncio.wait_for(api.recv(), 5))


async def next_event(api: Any) -> dict:
    """The next message on ``api``, decoded (bounded to 5 s)."""
    return json.loads(await asyncio.wait_for(api.recv(), 5))


async def until(predicate: Any, timeout: float = 5.0) -> None:
    """Wait (polling, from asyncio code) until ``predicate()`` is true; fail after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def upgrade_request(port: int, path: str = "/", extra: str = "") -> bytes:
    """The bytes of one WebSocket upgrade request (``extra``: more header lines, CRLF-ended)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n").encode()


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A raw, non-blocking TCP socket to ``port`` of 127.0.0.1 (``rcvbuf``: a small receive
    buffer, for clients that are meant to stop reading)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 5)
    return sock


async def read_head(sock: socket.socket) -> bytes:
    """The HTTP response head the server sends on ``sock`` (up to the blank line)."""
    loop = asyncio.get_running_loop()
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert chunk, head
        head += chunk
    return head


async def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout``)."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop.time())
        except (asyncio.TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


async def raw_handshake(port: int, path: str = "/", extra: str = "", rcvbuf: int = 4096) -> socket.socket:
    """A raw WebSocket client: handshake done, the socket is never read again."""
    sock = await connect(port, rcvbuf)
    await asyncio.get_running_loop().sock_sendall(sock, upgrade_request(port, path, extra))
    head = await read_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def masked_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final client frame (masked, as a client must) of up to 64 KiB."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + mask + body
