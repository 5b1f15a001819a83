"""The HTTP API and access control (docs/api.md) against the real service tree.

Integration tests start center + engine in this process on 127.0.0.1 port 0 and talk to them
with independent clients: ``websockets`` for ``/ws/v1`` and ``http.client`` (in a worker thread,
so the reactor keeps running) for HTTP.  A peer that is not loopback cannot be produced here:
protected mode's 403 is covered in test_auth; here only that loopback is admitted.  A few unit
tests at the end drive ``HttpApiMethod`` with a Twisted ``Request`` for answers from another
engine (Deferreds) and clients that leave before the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
import websockets
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel

from apihelpers import REMOTE_CLIENT_ID, Engine
from conftest import in_asyncio, loopback_config, start_engine
from connmix_tx.auth import UNAUTHORIZED_BODY
from connmix_tx.config import AccessConfig, UserConfig
from connmix_tx.engine.api_server import HttpApiMethod
from connmix_tx.testing import FakeLink
from connmix_tx.web import NOT_FOUND_BODY
from netclients import ALICE, BOB, CAROL, api_call, basic, compact_call, http_request, post

async def client_id_of(client: Any, api: Any) -> str:
    """The id of ``client``: it sends a message, the API pops it from the default topic."""
    assert await compact_call(api, "queue.pop", {"t": ["foo"]}) == {"E": None, "r": {"s": True}, "i": 1}
    await client.send("hello")
    event = json.loads(await asyncio.wait_for(api.recv(), 5))
    assert event["e"] == "queue.pop" and event["p"]["t"] == "foo"
    return event["p"]["c"]


# HTTP API, happy paths -----------------------------------------------------------------------------


@in_asyncio
async def test_send_and_publish(engine: Any) -> None:
    async with websockets.connect(engine.client_url) as client, websockets.connect(engine.api_url) as api:
        cid = await client_id_of(client, api)

        reply = await post(engine.api_port, "/v1/mesh/send", {"c": cid, "d": "hello, world!"})
        assert (reply.status, reply.json) == (200, {"E": None, "r": {"s": True}})
        assert await asyncio.wait_for(client.recv(), 5) == "hello, world!"
        reply = await post(engine.api_port, "/v1/mesh/send", {"c": int(cid), "d": "AP8=", "t": "binary"})
        assert reply.json == {"E": None, "r": {"s": True}}
        assert await asyncio.wait_for(client.recv(), 5) == b"\x00\xff"

        reply = await post(engine.api_port, "/v1/mesh/publish", {"c": "room", "d": "nobody"})
        assert (reply.status, reply.json) == (200, {"E": None, "r": {"s": 0, "f": 0, "t": 0}})
        assert await compact_call(api, "conn.call", {"c": cid, "f": "subscribe", "a": ["room"]}) == {
            "E": None, "r": {"s": True}, "i": 1}
        reply = await post(engine.api_port, "/v1/mesh/publish", {"c": "room", "d": "to all"})
        assert (reply.status, reply.json) == (200, {"E": None, "r": {"s": 1, "f": 0, "t": 1}})
        assert await asyncio.wait_for(client.recv(), 5) == "to all"


@in_asyncio
async def test_request_content_type_is_not_checked(engine: Any) -> None:
    reply = await post(engine.api_port, "/v1/mesh/publish", {"c": "room", "d": "x"},
                       {"Content-Type": "text/plain"})
    assert reply.json == {"E": None, "r": {"s": 0, "f": 0, "t": 0}}


# HTTP API, error paths ------------------------------------------------------------------------------


@in_asyncio
async def test_application_errors_are_200_with_e(engine: Any) -> None:
    missing = "1463819408261513216"
    cases = [("/v1/mesh/send", {"c": "abc", "d": "x"}, 101), ("/v1/mesh/send", {"c": missing}, 101),
             ("/v1/mesh/send", {"c": missing, "d": "x", "t": "json"}, 101),
             ("/v1/mesh/send", {"client_id": missing, "data": "x"}, 101),
             ("/v1/mesh/send", {"c": missing, "d": "x"}, 401),
             ("/v1/mesh/publish", {"c": "has space", "d": "x"}, 101), ("/v1/mesh/publish", {}, 101)]
    for path, body, code in cases:
        reply = await post(engine.api_port, path, body)
        assert reply.status == 200, (path, body)
        assert set(reply.json) == {"E", "r"} and reply.json["r"] is None and reply.json["E"]["c"] == code


@in_asyncio
async def test_invalid_json_is_400(engine: Any) -> None:
    for body in (b"{", b"", b"not json", b"[]", b'"text"', b"NaN", b'{"c":1,"d":NaN}'):
        reply = await post(engine.api_port, "/v1/mesh/send", body)
        assert (reply.status, reply.json["E"]["c"], reply.json["r"]) == (400, -32700, None), body


@in_asyncio
async def test_too_large_is_413(engine: Any) -> None:
    limit = engine.service.config.engine.api_server.max_message_size
    body = json.dumps({"c": "room", "d": "x" * limit}).encode()
    reply = await post(engine.api_port, "/v1/mesh/publish", body)
    assert (reply.status, reply.json["E"]["c"], reply.json["r"]) == (413, -32600, None)
    fits = json.dumps({"c": "room", "d": "x" * (limit - 100)}).encode()
    assert (await post(engine.api_port, "/v1/mesh/publish", fits)).status == 200


@in_asyncio
async def test_unknown_paths_are_404(engine: Any) -> None:
    for method, path in [("POST", "/v1/mesh/nope"), ("POST", "/v1/mesh"), ("GET", "/v1"), ("POST", "/"),
                         ("GET", "/ws/v2"), ("POST", "/v2/mesh/send")]:
        reply = await http_request(engine.api_port, method, path, b"{}")
        assert (reply.status, reply.body) == (404, NOT_FOUND_BODY), path
        assert reply.headers["content-type"] == "application/json"


@in_asyncio
async def test_wrong_method_is_405(engine: Any) -> None:
    for method in ("GET", "PUT", "DELETE"):
        for path in ("/v1/mesh/send", "/v1/mesh/publish"):
            reply = await http_request(engine.api_port, method, path)
            assert reply.status == 405 and reply.headers["allow"] == "POST"
            assert reply.json["E"]["c"] == -32601 and reply.json["r"] is None


# Protected mode (default config): loopback is admitted without credentials -----------------------


@in_asyncio
async def test_protected_mode_admits_loopback(engine: Any) -> None:
    assert engine.service.config.access == AccessConfig(users=(), protected=True)
    reply = await http_request(engine.center_api_port, "GET", "/version")
    assert (reply.status, reply.json) == (200, {"apis": ["v1"]})
    assert (await http_request(engine.center_api_port, "GET", "/v1/nodes")).status == 200
    assert (await post(engine.api_port, "/v1/mesh/publish", {"c": "c", "d": "x"})).status == 200
    async with websockets.connect(engine.api_url) as api:
        assert await compact_call(api, "queue.pop", ["foo"]) == {"E": None, "r": {"s": True}, "i": 1}


# Users configured ---------------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def secured() -> Any:
    """A dev-mode engine whose config has users alice (write), bob (read, 127.0.0.*), carol (10.*)."""
    access = AccessConfig(users=(ALICE, BOB, CAROL), protected=True)
    config = dataclasses.replace(loopback_config(), access=access)
    running = await Deferred.fromFuture(asyncio.ensure_future(start_engine(config)))
    yield running
    await running.service.stopService()
    assert running.fatal_calls == []


async def refused_handshake(url: str, headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5):
            pass
    return info.value.response


def assert_401(status: int, headers: Any, body: bytes) -> None:
    assert status == 401 and body == UNAUTHORIZED_BODY
    assert headers["WWW-Authenticate"] == 'Basic realm="connmix"'
    assert headers["Content-Type"] == "application/json"


@in_asyncio
async def test_ws_handshake_needs_credentials(secured: Any) -> None:
    url = secured.api_url
    for headers, query in [(None, ""), (basic(ALICE, "wrong"), ""), (None, "?username=alice&password=nope"),
                           (None, "?username=alice"), ({"Authorization": "Bearer x"}, "")]:
        response = await refused_handshake(url + query, headers)
        assert_401(response.status_code, response.headers, response.body)
    response = await refused_handshake(url, basic(CAROL))  # right password, host glob 10.* does not match
    assert response.status_code == 403 and json.loads(response.body)["E"]["c"] == -32001


@in_asyncio
async def test_ws_handshake_with_basic_or_query_credentials(secured: Any) -> None:
    async with websockets.connect(secured.api_url, additional_headers=basic(ALICE)) as api:
        assert await compact_call(api, "queue.pop", ["foo"]) == {"E": None, "r": {"s": True}, "i": 1}
    async with websockets.connect(secured.api_url + "?username=alice&password=s3cret") as api:
        assert (await api_call(api, "queue.consume", ["foo"]))["result"] == {"success": True}
    async with websockets.connect(secured.api_url + "?username=bob&password=reader") as api:
        assert await compact_call(api, "server.ping", {}) == {"E": None, "r": {"m": "server.pong"}, "i": 1}


@in_asyncio
async def test_read_only_user_over_ws_gets_32001_and_stays_connected(secured: Any) -> None:
    async with websockets.connect(secured.api_url, additional_headers=basic(BOB)) as api:
        reply = await compact_call(api, "queue.pop", ["foo"], request_id=2)
        assert reply["E"]["c"] == -32001 and reply["r"] is None and reply["i"] == 2
        reply = await api_call(api, "mesh.publish", [{"channel": "c", "data": "x"}], request_id=3)
        assert reply["error"]["code"] == -32001 and reply["id"] == 3
        reply = await compact_call(api, "mesh.send", {"c": "1463819408261513216", "d": "x"})
        assert reply["E"]["c"] == -32001
        reply = await api_call(api, "server.ping", [], 4)
        assert reply == {"error": None, "result": {"status": "server.pong"}, "id": 4}


@in_asyncio
async def test_http_api_auth_matrix(secured: Any) -> None:
    port, body = secured.api_port, {"c": "room", "d": "x"}
    for headers in (None, basic(ALICE, "wrong"), basic(UserConfig("nobody", "x", (), "*"))):
        reply = await post(port, "/v1/mesh/publish", body, headers)
        assert_401(reply.status, reply.headers, reply.body)
    # Query credentials are for the WebSocket handshake only.
    reply = await post(port, "/v1/mesh/publish?username=alice&password=s3cret", body)
    assert reply.status == 401
    reply = await post(port, "/v1/mesh/publish", body, basic(BOB))
    assert (reply.status, reply.json["E"]["c"], reply.json["r"]) == (403, -32001, None)
    reply = await post(port, "/v1/mesh/send", {"c": "1463819408261513216", "d": "x"}, basic(BOB))
    assert (reply.status, reply.json["E"]["c"]) == (403, -32001)
    reply = await post(port, "/v1/mesh/publish", body, basic(CAROL))
    assert reply.status == 403
    reply = await post(port, "/v1/mesh/publish", body, basic(ALICE))
    assert (reply.status, reply.json) == (200, {"E": None, "r": {"s": 0, "f": 0, "t": 0}})
    reply = await post(port, "/v1/mesh/send", {"c": "1463819408261513216", "d": "x"}, basic(ALICE))
    assert (reply.status, reply.json["E"]["c"]) == (200, 401)


@in_asyncio
async def test_every_path_needs_credentials(secured: Any) -> None:
    engine, center = secured.api_port, secured.center_api_port
    for port, path in [(engine, "/nothing"), (engine, "/v1/mesh/send"), (engine, "/ws/v1"),
                       (center, "/version"), (center, "/v1/nodes"), (center, "/nothing")]:
        reply = await http_request(port, "GET", path)
        assert_401(reply.status, reply.headers, reply.body)
    assert (await http_request(secured.api_port, "GET", "/nothing", headers=basic(BOB))).status == 404
    assert (await http_request(secured.api_port, "GET", "/v1/mesh/send", headers=basic(BOB))).status == 405


@in_asyncio
async def test_center_api_needs_the_read_role(secured: Any) -> None:
    reply = await http_request(secured.center_api_port, "GET", "/version", headers=basic(BOB))
    assert (reply.status, reply.json) == (200, {"apis": ["v1"]})
    reply = await http_request(secured.center_api_port, "GET", "/v1/nodes", headers=basic(ALICE))
    assert reply.status == 200 and len(reply.json["nodes"]) == 1
    reply = await http_request(secured.center_api_port, "GET", "/version", headers=basic(CAROL))
    assert reply.status == 403


# HttpApiMethod with answers from another engine (unit) -------------------------------------------------


def post_request(body: bytes) -> tuple[Request, DummyChannel]:
    channel = DummyChannel()
    request = Request(channel, False)
    request.method, request.uri, request.path = b"POST", b"/v1/mesh/send", b"/v1/mesh/send"
    request.clientproto = b"HTTP/1.1"
    request.content = BytesIO(body)
    return request, channel


def remote_send(pending: Deferred) -> tuple[Request, DummyChannel, Any]:
    api = Engine(link=FakeLink.answering(lambda: pending))
    resource = HttpApiMethod(api.dispatcher, "mesh.send", "node", 1024)
    request, channel = post_request(json.dumps({"c": str(REMOTE_CLIENT_ID), "d": "x"}).encode())
    return request, channel, resource.render(request)


def response_of(channel: DummyChannel) -> tuple[bytes, bytes]:
    head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("answer, body", [
    (None, {"E": None, "r": {"s": True}}),
    ("mesh timeout", {"E": {"c": 401, "m": "send failed: mesh timeout"}, "r": None}),
])
def test_answer_from_another_engine(answer, body) -> None:
    pending: Deferred = Deferred()
    request, channel, rendered = remote_send(pending)
    assert rendered is NOT_DONE_YET and channel.transport.written.getvalue() == b""
    pending.callback(answer)
    head, raw = response_of(channel)
    assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head.lower()
    assert json.loads(raw) == body


def test_internal_error_from_another_engine_is_500() -> None:
    pending: Deferred = Deferred()
    request, channel, _ = remote_send(pending)
    pending.errback(RuntimeError("boom"))
    head, raw = response_of(channel)
    assert head.startswith(b"HTTP/1.1 500") and json.loads(raw)["E"]["c"] == -32603


def test_client_gone_before_the_answer() -> None:
    pending: Deferred = Deferred()
    request, channel, _ = remote_send(pending)
    request.connectionLost(Failure(ConnectionDone()))
    pending.callback(None)  # nothing written, nothing raised
    assert channel.transport.written.getvalue() == b""
