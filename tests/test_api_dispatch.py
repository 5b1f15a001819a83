"""Tests for connmix_tx.engine.api: the long-form API and its error codes (docs/api.md).

Real queues (on a Clock), connection registry and router (``apihelpers.Engine``); fake client
transports and mesh links from ``connmix_tx.testing``.
Replies are compared by value (``json.loads``), never by text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from apihelpers import NODE_ID, REMOTE_CLIENT_ID, SEED_CLIENT_ID, Engine, raise_boom
from connmix_tx.engine.connections import SLOW_CONSUMER
from connmix_tx.testing import FakeLink


@pytest.fixture
def engine() -> Engine:
    return Engine()


def assert_error(reply: Any, code: int, request_id: Any = 12345) -> None:
    assert set(reply) == {"error", "id"}  # no "result" key on error
    assert set(reply["error"]) == {"code", "message"}
    assert reply["error"]["code"] == code and reply["id"] == request_id
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


def ok(result: dict, request_id: Any = 12345) -> dict:
    return {"error": None, "result": result, "id": request_id}


SUCCESS = ok({"success": True})
SENT = ok({"fail": 0, "success": True, "total": 1})


# Envelope ------------------------------------------------------------------------------------


def test_server_ping_as_the_seed(engine) -> None:
    raw = b'{"method":"server.ping","params":[],"id":12345}'
    assert engine.handle(raw) == {"error": None, "result": {"status": "server.pong"}, "id": 12345}


@pytest.mark.parametrize("request_id", ["abc", "", 0, -7, 1.5, True, None])
def test_id_is_echoed_unchanged(engine, request_id) -> None:
    assert engine.request("server.ping", request_id=request_id)["id"] == request_id


def test_missing_id_and_params(engine) -> None:
    assert engine.handle(b'{"method":"server.ping"}') == ok({"status": "server.pong"}, None)


@pytest.mark.parametrize("raw", [b"not json", b"{", b"", b"\xff\xfe{}", b'"text"', b"42", b"null"])
def test_parse_error(engine, raw) -> None:
    assert_error(engine.handle(raw), -32700, None)


INVALID_REQUESTS = [  # a batch, neither key, both keys, a non-string method, a non-scalar id
    b'[{"method":"server.ping","params":[],"id":1}]', b"[]", b'{"params":[],"id":1}',
    b'{"method":"server.ping","m":"server.ping","id":1}', b'{"method":5,"id":1}',
    b'{"method":"server.ping","id":[1]}',
]


@pytest.mark.parametrize("raw", INVALID_REQUESTS)
def test_invalid_request_is_answered_with_id_null(engine, raw) -> None:
    assert_error(engine.handle(raw), -32600, None)


@pytest.mark.parametrize("params", [{}, "foo", None, 5])
def test_params_not_a_list(engine, params) -> None:
    assert_error(engine.request("queue.consume", params, request_id=7), -32600, 7)


def test_unknown_method(engine) -> None:
    assert_error(engine.request("queue.explode", request_id="x"), -32601, "x")


# queue.consume / queue.unconsume -------------------------------------------------------------


def test_consume_then_event_has_the_seed_shape(engine) -> None:
    assert engine.handle(b'{"method":"queue.consume","params":["foo"],"id":12345}') == SUCCESS
    engine.queues.push("foo", str(SEED_CLIENT_ID), b'{"ctx":[],"msg":"foo"}')
    assert engine.written == []  # never inside push
    engine.clock.advance(0)
    assert [json.loads(e) for e in engine.written] == [{
        "event": "queue.consume",
        "result": {"client_id": "1463819408261513216", "node_id": NODE_ID, "queue": "foo",
                   "data": {"ctx": [], "msg": "foo"}},
        "id": None,
    }]


def test_push_first_then_consume(engine) -> None:
    for text in (b'"a"', b'"b"'):
        engine.queues.push("foo", "", text)
    assert engine.request("queue.consume", ["foo", "bar"]) == SUCCESS
    engine.clock.advance(0)
    events = [json.loads(e)["result"] for e in engine.written]
    assert [(e["client_id"], e["queue"], e["data"]) for e in events] == [("", "foo", "a"), ("", "foo", "b")]


@pytest.mark.parametrize("params", [[], [5], [None], [""], ["a b"], ["x" * 256], ["ok", ["nested"]]])
def test_consume_invalid_params(engine, params) -> None:
    assert_error(engine.request("queue.consume", params), 101)
    assert engine.queues.topics == {}


def test_consume_failed_too_many_topics() -> None:
    engine = Engine(max_topics=1)
    assert_error(engine.request("queue.consume", ["a", "b"]), 201)
    assert engine.queues.consumes(engine.session) == []


def test_duplicate_consumption(engine) -> None:
    assert engine.request("queue.consume", ["foo"]) == SUCCESS
    assert_error(engine.request("queue.consume", ["bar", "foo"]), 202)
    assert_error(engine.request("queue.consume", ["baz", "baz"]), 202)
    assert engine.queues.consumes(engine.session) == ["foo"]
    assert engine.request("queue.consume", ["foo"], session=engine.new_session()) == SUCCESS


def test_unconsume(engine) -> None:
    assert_error(engine.request("queue.unconsume"), 203)
    engine.request("queue.consume", ["foo", "bar"])
    assert_error(engine.request("queue.unconsume", ["foo"]), 101)
    assert engine.handle(b'{"method":"queue.unconsume","params":[],"id":12345}') == SUCCESS
    engine.queues.push("foo", "", b"1")
    engine.clock.advance(1)
    assert engine.written == []
    assert_error(engine.request("queue.unconsume"), 203)


# conn.call -----------------------------------------------------------------------------------


def call(engine: Engine, func: str, args: Any, client_id: Any = str(SEED_CLIENT_ID)) -> Any:
    return engine.request("conn.call", [{"client_id": client_id, "func": func, "args": args}])


def test_context_and_close_as_the_seed(engine) -> None:
    conn = engine.connect()
    assert call(engine, "set_context_value", ["user_id", 10000]) == SUCCESS
    assert conn.context == {"user_id": 10000}
    assert call(engine, "set_context", [{"room": "r1"}], client_id=SEED_CLIENT_ID) == SUCCESS
    assert conn.context == {"user_id": 10000, "room": "r1"}
    assert call(engine, "close", []) == SUCCESS
    assert conn.transport.closed


def test_subscribe_makes_publish_reach_the_connection(engine) -> None:
    conn, other = engine.connect(), engine.connect(SEED_CLIENT_ID + 1)
    assert call(engine, "subscribe", ["channel1", "channel2"]) == SUCCESS
    reply = engine.request("mesh.publish", [{"channel": "channel1", "data": "123456789"}])
    assert reply == ok({"fail": 0, "success": True, "total": 1})
    assert conn.transport.delivered == [(b"123456789", False)] and other.transport.delivered == []
    assert call(engine, "unsubscribe", ["channel1"]) == SUCCESS
    assert engine.request("mesh.publish", [{"channel": "channel1", "data": "x"}])["result"]["total"] == 0


@pytest.mark.parametrize("client_id", ["abc", "0", -1, "-1", 1.5, True, None, str(2**63)])
def test_conn_call_bad_client_id(engine, client_id) -> None:
    assert_error(call(engine, "close", [], client_id=client_id), 101)


@pytest.mark.parametrize(
    "func, args",
    [("explode", []), (None, []), ("close", "x"), ("close", ["x"]), ("set_context_value", ["k"]),
     ("set_context_value", [["k"], 1]), ("set_context", []), ("set_context", ["x"]), ("subscribe", []),
     ("subscribe", ["a b"]), ("unsubscribe", [5])],
)
def test_conn_call_bad_func_or_args(engine, func, args) -> None:
    engine.connect()
    assert_error(call(engine, func, args), 101)


@pytest.mark.parametrize("params", [[], ["x"], [{}, {}]])
def test_conn_call_needs_one_object(engine, params) -> None:
    assert_error(engine.request("conn.call", params), 101)


def test_conn_call_failed(engine) -> None:
    assert_error(call(engine, "close", []), 301)  # client not found
    assert_error(call(engine, "close", [], client_id=str(REMOTE_CLIENT_ID)), 301)  # node unavailable
    engine.connect()
    assert call(engine, "subscribe", [f"c{i}" for i in range(128)]) == SUCCESS
    assert_error(call(engine, "subscribe", ["one-more"]), 301)  # subscribe limit


# mesh.send / mesh.publish --------------------------------------------------------------------


def test_mesh_send_as_the_seed(engine) -> None:
    conn = engine.connect()
    raw = (b'{"method":"mesh.send","params":[{"client_id":"1463819408261513216","data":"hello, world!"}],'
           b'"id":12345}')
    assert engine.handle(raw) == {"error": None, "result": {"fail": 0, "success": True, "total": 1},
                                  "id": 12345}
    assert conn.transport.delivered == [(b"hello, world!", False)]


def test_mesh_send_client_id_as_json_number_and_binary(engine) -> None:
    conn = engine.connect()
    spec = {"client_id": SEED_CLIENT_ID, "data": "AAEC/w==", "type": "binary"}
    assert engine.request("mesh.send", [spec]) == SENT
    assert engine.request("mesh.send", [{"client_id": SEED_CLIENT_ID, "data": "t", "type": "text"}]) == SENT
    assert conn.transport.delivered == [(b"\x00\x01\x02\xff", True), (b"t", False)]


@pytest.mark.parametrize(
    "spec",
    [{}, {"data": 5}, {"data": None}, {"data": "x", "type": "json"}, {"data": "x", "type": None},
     {"data": "!!!!", "type": "binary"}, {"data": "abc", "type": "binary"}, {"data": "x", "client_id": "x1"},
     {"data": "x", "client_id": None}],
)
def test_mesh_send_invalid_params(engine, spec) -> None:
    conn = engine.connect()
    assert_error(engine.request("mesh.send", [{"client_id": str(SEED_CLIENT_ID), **spec}]), 101)
    assert conn.transport.delivered == []


def test_mesh_send_failed(engine) -> None:
    assert_error(engine.request("mesh.send", [{"client_id": "1463819408261513216", "data": "x"}]), 401)
    remote = {"client_id": str(REMOTE_CLIENT_ID), "data": "x"}
    assert_error(engine.request("mesh.send", [remote]), 401)  # node unavailable
    engine.connect(error=SLOW_CONSUMER)
    assert_error(engine.request("mesh.send", [{"client_id": SEED_CLIENT_ID, "data": "x"}]), 401)


def test_mesh_publish_counts(engine) -> None:
    spec = {"channel": "channel1", "data": "123456789"}
    assert engine.request("mesh.publish", [spec]) == ok({"fail": 0, "success": True, "total": 0})
    for i, error in enumerate([None, None, SLOW_CONSUMER]):
        engine.connections.subscribe(engine.connect(SEED_CLIENT_ID + i, error), ["channel1"])
    assert engine.request("mesh.publish", [spec]) == ok({"fail": 1, "success": True, "total": 3})


@pytest.mark.parametrize(
    "spec",
    [{"data": "x"}, {"channel": "a b", "data": "x"}, {"channel": 5, "data": "x"},
     {"channel": "", "data": "x"}, {"channel": "c"}, {"channel": "c", "data": "x", "type": "bin"}],
)
def test_mesh_publish_invalid_params(engine, spec) -> None:
    assert_error(engine.request("mesh.publish", [spec]), 101)


# Answers from another engine ------------------------------------------------------------------


def test_remote_answers_arrive_as_deferreds() -> None:
    pending: Deferred = Deferred()
    engine = Engine(link=FakeLink.answering(lambda: pending))
    reply = engine.dispatcher.handle(engine.session, json.dumps(
        {"method": "mesh.send", "params": [{"client_id": str(REMOTE_CLIENT_ID), "data": "x"}], "id": 3}
    ).encode())
    assert isinstance(reply, Deferred) and not reply.called
    pending.callback(None)
    assert json.loads(reply.result) == ok({"fail": 0, "success": True, "total": 1}, 3)


@pytest.mark.parametrize("method, code", [("mesh.send", 401), ("conn.call", 301)])
def test_remote_errors(method, code) -> None:
    engine = Engine(link=FakeLink.answering(lambda: succeed("mesh timeout")))
    spec = {"client_id": str(REMOTE_CLIENT_ID), "data": "x", "func": "close", "args": []}
    assert_error(engine.request(method, [spec]), code)


def test_remote_publish_is_summed() -> None:
    engine = Engine(link=FakeLink.answering(lambda: succeed((4, 1))))
    assert engine.request("mesh.publish", [{"channel": "c", "data": "x"}]) == ok(
        {"fail": 1, "success": True, "total": 5})


@pytest.mark.parametrize("answer", [raise_boom, lambda: fail(RuntimeError("boom"))], ids=["raises", "errback"])
def test_internal_error(answer) -> None:
    engine = Engine(link=FakeLink.answering(answer))
    assert_error(engine.request("mesh.send", [{"client_id": str(REMOTE_CLIENT_ID), "data": "x"}]), -32603)


# Bugs ----------------------------------------------------------------------------------------


def test_lone_surrogates_never_make_handle_raise(engine) -> None:
    # An escaped lone surrogate is valid JSON text: echoed as an id, named in the error message.
    reply = json.loads(engine.dispatcher.handle(engine.session, b'{"method":"server.ping","id":"\\ud800"}'))
    assert reply == ok({"status": "server.pong"}, "\ud800")
    reply = json.loads(engine.dispatcher.handle(engine.session, b'{"method":"\\ud800","id":1}'))
    assert_error(reply, -32601, 1)
    assert reply["error"]["message"] == "method not found: \ud800"


def _strict(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.parametrize(
    "raw", [b'{"method":"server.ping","id":NaN}', b'{"method":"server.ping","id":-Infinity}'],
    ids=["NaN", "Inf"],
)
def test_replies_are_always_strict_json(engine, raw) -> None:
    reply = json.loads(engine.dispatcher.handle(engine.session, raw), parse_constant=_strict)
    assert_error(reply, -32700, None)  # NaN / Infinity are not JSON: a parse error, id null
