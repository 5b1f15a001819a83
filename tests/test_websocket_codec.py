"""The checks of the Lua RFC 6455 codec (lua/protocols/websocket.lua) that Autobahn's cases 1.1.7,
6.x and 7.x exercise: UTF-8 of text messages (1007), close frames (1002 / 1007) and payloads over
the codec's limit (1009).  The frames go through a socket server as in test_socket_server.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from socketservers import client_frame, lost, module_function, open_websocket, server_frames

EURO = "\u20ac".encode()  # e2 82 ac
GRIN = "\U0001f600".encode()  # f0 9f 98 80

VALID = [b"", b"ascii", "\u00e9".encode(), EURO, GRIN, "\ud7ff\ue000\uffff\U0010ffff".encode(),
         b"a" * 5000 + EURO * 3000 + b"z", "κόσμε".encode()]
INVALID = [
    b"\x80", b"\xbf", b"a\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf",  # overlong
    b"\xed\xa0\x80", b"\xed\xbf\xbf",  # surrogates
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xfe",  # beyond U+10FFFF, never used
    b"\xf0\x8f\xbf\xbf",  # overlong 4 bytes
    b"\xc3", b"\xe2\x82", GRIN[:3], b"ok\xc3(", EURO[:2] + b"a", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
]


def closes_with(transport, code: int) -> None:
    frames = server_frames(transport.value())
    assert frames and frames[-1] == (8, struct.pack("!H", code))
    assert transport.disconnecting


@pytest.mark.parametrize("data", VALID)
def test_utf8_valid_accepts_utf8(tmp_path: Path, data: bytes) -> None:
    server, _, _ = open_websocket(tmp_path)
    assert module_function(server, "protocols.websocket", "utf8_valid")(data) is True


@pytest.mark.parametrize("data", INVALID)
def test_utf8_valid_refuses_the_rest(tmp_path: Path, data: bytes) -> None:
    server, _, _ = open_websocket(tmp_path)
    assert module_function(server, "protocols.websocket", "utf8_valid")(data) is False


@pytest.mark.parametrize("data", INVALID)
def test_invalid_utf8_text_closes_with_1007(tmp_path: Path, data: bytes) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(1, data))
    closes_with(transport, 1007)
    lost(proto)
    assert server.log() == ["close nil"]  # nothing reached on_message


def test_binary_frames_are_not_checked(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    proto.dataReceived(client_frame(2, b"\xff\xc0"))
    assert not transport.disconnecting and json.loads(server.log()[0])["type"] == "binary"


def test_a_sequence_may_continue_in_the_next_fragments(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    message = b"x" + EURO + GRIN + b"y"
    parts = [message[:2], message[2:3], message[3:6], b"", message[6:]]
    for i, part in enumerate(parts):
        proto.dataReceived(client_frame(0 if i else 1, part, fin=i == len(parts) - 1))
    assert not transport.disconnecting and transport.value() == b""
    datas = [json.loads(m) for m in server.log()]
    # (The test entry JSON-encodes each fragment on its own: split sequences show as U+FFFD.)
    assert datas[0]["data"].startswith("x") and datas[-1]["data"].endswith("y")
    assert [d["finish"] for d in datas] == [False] * 4 + [True]
    # The next message starts afresh; a binary message in between is not checked.
    proto.dataReceived(client_frame(2, b"\xe2", fin=False) + client_frame(0, b"\xff")
                       + client_frame(1, EURO))
    assert not transport.disconnecting and json.loads(server.log()[-1])["data"] == "\u20ac"


def test_an_unfinished_sequence_at_the_end_of_a_message_closes(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(1, b"a" + EURO[:1], fin=False))
    assert not transport.disconnecting
    proto.dataReceived(client_frame(0, EURO[1:2], fin=True))
    closes_with(transport, 1007)


def test_an_invalid_fragment_closes_at_once(tmp_path: Path) -> None:
    # Fail fast: the fragment that makes the message invalid closes, before the message ends.
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(1, b"good" + EURO[:2], fin=False))
    assert not transport.disconnecting
    proto.dataReceived(client_frame(0, b"bad", fin=False))
    closes_with(transport, 1007)
    lost(proto)
    assert len(server.log()) == 2  # the first fragment, then the close


@pytest.mark.parametrize("payload", [b"", struct.pack("!H", 1000)] + [
    struct.pack("!H", code) + b"reason \xe2\x82\xac"
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                 3000, 3999, 4000, 4999)
])
def test_valid_close_frames_are_answered_with_their_code(tmp_path: Path, payload: bytes) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(8, payload))
    assert server_frames(transport.value()) == [(8, payload[:2])] and transport.disconnecting
    lost(proto)
    assert server.log() == ["close nil"]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_answered_with_1002(tmp_path: Path, code: int) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(8, struct.pack("!H", code) + b"x"))
    closes_with(transport, 1002)


def test_a_one_byte_close_payload_is_answered_with_1002(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(8, b"\x03"))
    closes_with(transport, 1002)


def test_a_close_reason_that_is_not_utf8_is_answered_with_1007(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path)
    transport.clear()
    proto.dataReceived(client_frame(8, struct.pack("!H", 1000) + b"\xce\xba\xed\xa0\x80"))
    closes_with(transport, 1007)


def test_64_kib_messages_pass(tmp_path: Path) -> None:
    # Autobahn 1.1.7 / 1.2.7: 65 536 bytes (the frame arrives in one read here).
    server, proto, transport = open_websocket(tmp_path, max_message_size=1 << 20)
    proto.dataReceived(client_frame(1, b"*" * 65536) + client_frame(2, b"\x00" * 70000))
    assert not transport.disconnecting
    messages = [json.loads(m) for m in server.log()]
    assert messages[0]["data"] == "*" * 65536 and len(messages) == 2


def test_a_payload_over_the_limit_is_answered_with_1009(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path, options={"maxPayload": "1000"})
    transport.clear()
    proto.dataReceived(client_frame(1, b"x" * 1000))
    assert not transport.disconnecting
    # Only the header has arrived: the close is sent before the payload is read.
    proto.dataReceived(client_frame(2, b"y" * 1001)[:8])
    closes_with(transport, 1009)
    lost(proto)
    assert server.log()[-1] == "close nil"


def test_the_default_limit_is_one_mib(tmp_path: Path) -> None:
    server, proto, transport = open_websocket(tmp_path, max_message_size=1 << 22)
    transport.clear()
    proto.dataReceived(client_frame(2, b"\x01" * (1 << 20)))
    assert not transport.disconnecting and len(server.log()) == 1
    proto.dataReceived(client_frame(2, b"\x01" * ((1 << 20) + 1))[:14])
    closes_with(transport, 1009)
