"""Socket servers for unit tests: a ``SocketServerFactory`` on a wired-up Lua engine, driven with
``StringTransport`` and a ``Clock``, plus the shipped codecs (``lua/protocols/``) and raw RFC 6455
frames for the Lua WebSocket codec.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from conftest import REPO
from connmix_tx.config import ServerConfig, default_config
from connmix_tx.engine.socket_server import SocketServerFactory, SocketServerProtocol
from connmix_tx.ids import Snowflake
from luahelpers import Engine, make_engine


def server_config(**overrides: Any) -> ServerConfig:
    return dataclasses.replace(default_config().engine.servers[0], protocol="socket", **overrides)


@dataclasses.dataclass
class Server:
    """A socket server factory on a wired-up Lua engine; ``log()`` reads the queue topic ``log``."""

    engine: Engine
    factory: SocketServerFactory

    def connect(self) -> tuple[SocketServerProtocol, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        proto.makeConnection(transport)
        return proto, transport

    def log(self) -> list[str]:
        topic = self.engine.queues.topics.get("log")
        return [json.loads(data) for _, data in topic.messages] if topic else []


def build_server(
    tmp_path: Path, source: str, options: dict[str, str] | None = None, **config: Any
) -> Server:
    """A socket server running ``source`` (the shipped codecs beside it), on a ``Clock``."""
    shutil.copytree(REPO / "lua" / "protocols", tmp_path / "lua" / "protocols", dirs_exist_ok=True)
    engine = make_engine(tmp_path, source, kind="socket", stubs=False, options=options, topic_size=10_000)
    factory = SocketServerFactory(server_config(**config), engine.script, engine.connections,
                                  Snowflake(0), engine.clock)
    return Server(engine, factory)


def lost(proto: SocketServerProtocol, reason: Exception | None = None) -> None:
    """The transport reports the end of the connection (StringTransport never does)."""
    proto.connectionLost(Failure(reason or ConnectionDone()))


CODEC_ENTRY = r"""
local codec = require('protocols.{name}')
function on_connect(client_id) end
function protocol_input(buf) return codec.input(buf{input_args}) end
function protocol_decode(packet) return codec.decode(packet) end
function protocol_encode(data, type) return codec.encode(data, type) end
function on_message(v)
  if type(v) == 'table' then v = mix.json_encode(v) end
  mix.queue.push('log', v)
end
function on_close(client_id, err)
  if codec.forget then codec.forget(client_id) end
  mix.queue.push('log', 'close ' .. tostring(err))
end
"""


def codec_server(tmp_path: Path, name: str, input_args: str = "", **config: Any) -> Server:
    """A socket server whose entry uses the shipped codec ``protocols.<name>``."""
    source = CODEC_ENTRY.replace("{name}", name).replace("{input_args}", input_args)
    return build_server(tmp_path, source, **config)


def module_function(server: Server, module: str, name: str) -> Any:
    """Function ``name`` of a shipped codec module, as the entry's ``require`` loads it."""
    script = server.engine.script
    env = script._generation.env  # type: ignore[union-attr]
    return script.runtime.execute(b"local env, m, f = ... return env.require(m)[f]", env,
                                  module.encode(), name.encode())


HANDSHAKE = (
    b"GET /chat?x=1 HTTP/1.1\r\nHost: example\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Twice: a\r\n"
    b"X-Twice: b\r\n\r\n"
)


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """One client frame, masked with ``mask``."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of every (unmasked, final) frame the server wrote."""
    frames = []
    while data:
        first, second = data[0], data[1]
        assert second & 0x80 == 0  # the server never masks
        size, offset = second & 0x7F, 2
        if size == 126:
            size, offset = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            size, offset = struct.unpack("!Q", data[2:10])[0], 10
        assert first & 0x80
        frames.append((first & 0x0F, data[offset:offset + size]))
        data = data[offset + size:]
    return frames


def open_websocket(tmp_path: Path, **config: Any) -> tuple[Server, SocketServerProtocol, StringTransport]:
    """A socket server with the shipped WebSocket codec and one connection past its handshake."""
    server = codec_server(tmp_path, "websocket", ", '/chat'", **config)
    proto, transport = server.connect()
    for i in range(0, len(HANDSHAKE), 50):
        proto.dataReceived(HANDSHAKE[i:i + 50])
    return server, proto, transport
