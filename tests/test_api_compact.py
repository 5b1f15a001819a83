"""Tests for connmix_tx.engine.api: the compact dialect next to the long one (docs/api.md).

Same harness as test_api_dispatch (real queues on a Clock, real router, fake transports and mesh
link).  Every method is exercised in both dialects with the same inputs, and queue events are
checked to follow the dialect of the request that started each consumption.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from apihelpers import NODE_ID, REMOTE_CLIENT_ID, SEED_CLIENT_ID, Engine, raise_boom
from connmix_tx.engine.api import COMPACT, ApiError
from connmix_tx.engine.connections import SLOW_CONSUMER
from connmix_tx.testing import FakeLink


@pytest.fixture
def api() -> Engine:
    return Engine()


def compact(api: Engine, method: str, p: Any = None, request_id: Any = 7, **kw: Any) -> Any:
    body: dict[str, Any] = {"m": method, "i": request_id}
    if p is not None:
        body["p"] = p
    return api.handle(json.dumps(body).encode(), **kw)


def long(api: Engine, method: str, params: list, request_id: Any = 7) -> Any:
    return api.request(method, params, request_id)


def r(result: dict, request_id: Any = 7) -> dict:
    return {"E": None, "r": result, "i": request_id}


def assert_compact_error(reply: Any, code: int, request_id: Any = 7) -> None:
    assert set(reply) == {"E", "r", "i"} and reply["r"] is None
    assert set(reply["E"]) == {"c", "m"} and reply["E"]["c"] == code and reply["i"] == request_id
    assert isinstance(reply["E"]["m"], str) and reply["E"]["m"]


def assert_long_error(reply: Any, code: int, request_id: Any = 7) -> None:
    assert set(reply) == {"error", "id"} and reply["error"]["code"] == code and reply["id"] == request_id


S = r({"s": True})


# Envelope and dialect detection ---------------------------------------------------------------


@pytest.mark.parametrize("p", [None, {}, []])
def test_ping(api, p) -> None:
    assert compact(api, "server.ping", p) == r({"m": "server.pong"})


def test_ping_as_written_by_hand(api) -> None:
    assert api.handle(b'{"m":"server.ping","p":{},"i":12345}') == {"E": None, "r": {"m": "server.pong"},
                                                                  "i": 12345}
    assert api.handle(b'{"m":"server.ping"}') == r({"m": "server.pong"}, None)


@pytest.mark.parametrize("request_id", ["abc", "", 0, 1.5, False, None])
def test_i_is_echoed(api, request_id) -> None:
    assert compact(api, "server.ping", request_id=request_id)["i"] == request_id


def test_compact_key_order(api) -> None:
    raw = api.dispatcher.handle(api.session, b'{"m":"server.ping","i":1}')
    assert raw == b'{"E":null,"r":{"m":"server.pong"},"i":1}'
    raw = api.dispatcher.handle(api.session, b'{"m":"no.such","i":1}')
    assert raw.startswith(b'{"E":{"c":-32601,') and raw.endswith(b',"r":null,"i":1}')


@pytest.mark.parametrize(
    "raw", [b'{"i":1}', b'{"p":[],"i":1}', b'{"m":"server.ping","method":"server.ping","i":1}']
)
def test_neither_or_both_keys_answer_in_the_long_form(api, raw) -> None:
    assert_long_error(api.handle(raw), -32600, None)


@pytest.mark.parametrize("raw", [b'{"m":"server.ping"', b"[]", b'[{"m":"server.ping"}]', b"7"])
def test_parse_errors_and_batches_answer_in_the_long_form(api, raw) -> None:
    assert "error" in api.handle(raw) and api.handle(raw)["id"] is None


@pytest.mark.parametrize("raw", [b'{"m":5,"i":1}', b'{"m":null,"i":1}', b'{"m":"server.ping","i":{"x":1}}'])
def test_invalid_compact_request_is_compact_with_i_null(api, raw) -> None:
    assert_compact_error(api.handle(raw), -32600, None)


@pytest.mark.parametrize("p", ["foo", 5, True])
def test_p_of_the_wrong_type(api, p) -> None:
    assert_compact_error(compact(api, "queue.pop", p), -32600)
    assert_compact_error(api.handle(b'{"m":"server.ping","p":null,"i":7}'), -32600)


def test_unknown_method(api) -> None:
    assert_compact_error(compact(api, "queue.explode"), -32601)


def test_compact_names_are_not_long_names(api) -> None:
    assert_long_error(long(api, "queue.pop", ["foo"]), -32601)
    assert_long_error(long(api, "queue.unpop", []), -32601)


# queue.pop / queue.unpop ----------------------------------------------------------------------


@pytest.mark.parametrize("p", [{"t": ["foo", "bar"]}, ["foo", "bar"], [{"t": ["foo", "bar"]}]])
def test_pop_shapes(api, p) -> None:
    assert compact(api, "queue.pop", p) == S
    assert sorted(api.queues.consumes(api.session)) == ["bar", "foo"]


def test_long_name_accepted_in_compact(api) -> None:
    assert compact(api, "queue.consume", {"t": ["foo"]}) == S
    api.queues.push("foo", "", b"1")
    api.clock.advance(0)
    assert json.loads(api.written[0])["e"] == "queue.pop"  # compact request -> compact events
    assert compact(api, "queue.unconsume", {}) == S


@pytest.mark.parametrize("p", [{}, [], {"t": []}, {"t": "foo"}, {"t": [5]}, {"t": ["a b"]}, [["foo"]],
                               [{"t": ["a"]}, {"t": ["b"]}]])
def test_pop_invalid_params(api, p) -> None:
    assert_compact_error(compact(api, "queue.pop", p), 101)
    assert api.queues.topics == {}


def test_pop_failed_and_duplicate() -> None:
    api = Engine(max_topics=1)
    assert_compact_error(compact(api, "queue.pop", {"t": ["a", "b"]}), 201)
    assert compact(api, "queue.pop", {"t": ["a"]}) == S
    assert_compact_error(compact(api, "queue.pop", ["a"]), 202)
    assert_compact_error(compact(api, "queue.pop", ["x", "x"]), 202)


@pytest.mark.parametrize("p", [None, {}, [], [{}]])
def test_unpop_shapes(api, p) -> None:
    assert_compact_error(compact(api, "queue.unpop", p), 203)
    compact(api, "queue.pop", ["foo"])
    assert compact(api, "queue.unpop", p) == S
    assert api.queues.consumes(api.session) == []


@pytest.mark.parametrize("p", [["foo"], {"t": ["foo"]}, [{"x": 1}], [{}, {}]])
def test_unpop_takes_nothing(api, p) -> None:
    compact(api, "queue.pop", ["foo"])
    assert_compact_error(compact(api, "queue.unpop", p), 101)
    assert api.queues.consumes(api.session) == ["foo"]


# Events follow the dialect of the consumption ------------------------------------------------------


def events(api: Engine) -> list[dict]:
    api.clock.advance(0)
    out = [json.loads(e) for e in api.written]
    api.written.clear()
    return out


def test_compact_event_shape(api) -> None:
    api.queues.push("foo", str(SEED_CLIENT_ID), b'{"ctx":[],"msg":"foo"}')
    assert compact(api, "queue.pop", {"t": ["foo"]}) == S
    assert events(api) == [{"e": "queue.pop", "p": {"n": NODE_ID, "c": "1463819408261513216", "t": "foo",
                                                   "d": {"ctx": [], "msg": "foo"}}}]


def test_compact_event_key_order(api) -> None:
    compact(api, "queue.pop", ["foo"])
    api.queues.push("foo", "", b"1")
    api.clock.advance(0)
    assert api.written == [b'{"e":"queue.pop","p":{"n":"' + NODE_ID.encode() + b'","c":"","t":"foo","d":1}}']


def test_one_connection_mixes_dialects_per_consumption(api) -> None:
    assert long(api, "queue.consume", ["a"]) == {"error": None, "result": {"success": True}, "id": 7}
    assert compact(api, "queue.pop", ["b"]) == S
    api.queues.push("a", "", b'"to a"')
    api.queues.push("b", "", b'"to b"')
    # Topics are dispatched in no particular order relative to each other.
    got = sorted(events(api), key=lambda e: "e" in e)
    assert [e.get("event") or e.get("e") for e in got] == ["queue.consume", "queue.pop"]
    assert got[0]["result"]["data"] == "to a" and got[1]["p"]["d"] == "to b"
    # Later compact requests do not change the dialect of the long consumption.
    assert compact(api, "server.ping") == r({"m": "server.pong"})
    api.queues.push("a", "", b"2")
    assert events(api)[0]["event"] == "queue.consume"


def test_unconsume_then_consume_again_in_the_other_dialect(api) -> None:
    compact(api, "queue.pop", ["foo"])
    assert long(api, "queue.unconsume", [])["result"] == {"success": True}
    long(api, "queue.consume", ["foo"])
    api.queues.push("foo", "", b"1")
    assert events(api)[0]["event"] == "queue.consume"
    assert compact(api, "queue.unpop") == S
    compact(api, "queue.pop", ["foo"])
    api.queues.push("foo", "", b"2")
    assert events(api)[0]["e"] == "queue.pop"


def test_dialects_are_per_connection(api) -> None:
    other = api.new_session()
    long(api, "queue.consume", ["foo"])
    compact(api, "queue.pop", ["foo"], session=other)
    api.queues.push("foo", "", b"1")
    api.queues.push("foo", "", b"2")
    got = events(api)
    assert sorted(("event" in e, "e" in e) for e in got) == [(False, True), (True, False)]


# conn.call -----------------------------------------------------------------------------------------


def test_conn_call(api) -> None:
    conn = api.connect()
    spec = {"c": str(SEED_CLIENT_ID), "f": "set_context_value", "a": ["user_id", 10000]}
    assert compact(api, "conn.call", spec) == S
    assert compact(api, "conn.call", [{"c": SEED_CLIENT_ID, "f": "subscribe", "a": ["ch"]}]) == S
    assert conn.context == {"user_id": 10000} and "ch" in api.connections.channels
    assert compact(api, "conn.call", {"c": SEED_CLIENT_ID, "f": "close"}) == S  # a defaults to []
    assert conn.transport.closed


@pytest.mark.parametrize(
    "p",
    [{}, [], ["x"], [{}, {}], {"c": "abc", "f": "close", "a": []}, {"c": str(SEED_CLIENT_ID), "f": "nope"},
     {"c": str(SEED_CLIENT_ID), "f": "subscribe", "a": []},
     {"c": str(SEED_CLIENT_ID), "f": "close", "a": "x"},
     # long keys are not compact keys
     {"client_id": str(SEED_CLIENT_ID), "func": "close", "args": []}],
)
def test_conn_call_invalid_params(api, p) -> None:
    api.connect()
    assert_compact_error(compact(api, "conn.call", p), 101)


def test_conn_call_failed(api) -> None:
    assert_compact_error(compact(api, "conn.call", {"c": SEED_CLIENT_ID, "f": "close", "a": []}), 301)


# mesh.send / mesh.publish -----------------------------------------------------------------------


def test_mesh_send(api) -> None:
    conn = api.connect()
    assert compact(api, "mesh.send", {"c": "1463819408261513216", "d": "hello"}) == S
    assert compact(api, "mesh.send", [{"c": SEED_CLIENT_ID, "d": "AP8=", "t": "binary"}]) == S
    assert compact(api, "mesh.send", {"c": SEED_CLIENT_ID, "d": "t", "t": "text"}) == S
    assert conn.transport.delivered == [(b"hello", False), (b"\x00\xff", True), (b"t", False)]


@pytest.mark.parametrize(
    "p",
    [{}, {"d": "x"}, {"c": "x1", "d": "x"}, {"c": SEED_CLIENT_ID}, {"c": SEED_CLIENT_ID, "d": 5},
     {"c": SEED_CLIENT_ID, "d": "!!", "t": "binary"}, {"c": SEED_CLIENT_ID, "d": "x", "t": "json"},
     {"client_id": SEED_CLIENT_ID, "data": "x"}],
)
def test_mesh_send_invalid_params(api, p) -> None:
    conn = api.connect()
    assert_compact_error(compact(api, "mesh.send", p), 101)
    assert conn.transport.delivered == []


def test_mesh_send_failed(api) -> None:
    assert_compact_error(compact(api, "mesh.send", {"c": SEED_CLIENT_ID, "d": "x"}), 401)
    api.connect(error=SLOW_CONSUMER)
    assert_compact_error(compact(api, "mesh.send", {"c": SEED_CLIENT_ID, "d": "x"}), 401)


def test_mesh_publish_counts(api) -> None:
    assert compact(api, "mesh.publish", {"c": "ch", "d": "x"}) == r({"s": 0, "f": 0, "t": 0})
    for i, error in enumerate([None, None, SLOW_CONSUMER]):
        api.connections.subscribe(api.connect(SEED_CLIENT_ID + i, error), ["ch"])
    reply = compact(api, "mesh.publish", [{"c": "ch", "d": "AA==", "t": "binary"}])
    assert reply == r({"s": 2, "f": 1, "t": 3})
    assert api.connections.get(SEED_CLIENT_ID).transport.delivered == [(b"\x00", True)]


@pytest.mark.parametrize("p", [{}, {"d": "x"}, {"c": "a b", "d": "x"}, {"c": "ch"},
                               {"c": "ch", "d": "x", "t": 1}, {"channel": "ch", "data": "x"}])
def test_mesh_publish_invalid_params(api, p) -> None:
    assert_compact_error(compact(api, "mesh.publish", p), 101)


# The same inputs give the same codes in both dialects -----------------------------------------------


SAME_CODES = [  # (long method, long params, compact method, compact p, code)
    ("server.ping", [], "server.ping", {}, 0),
    ("queue.consume", [], "queue.pop", [], 101),
    ("queue.consume", ["a b"], "queue.pop", {"t": ["a b"]}, 101),
    ("queue.unconsume", [], "queue.unpop", {}, 203),
    ("queue.unconsume", ["x"], "queue.unpop", ["x"], 101),
    ("conn.call", [{"client_id": "0", "func": "close", "args": []}], "conn.call",
     {"c": "0", "f": "close"}, 101),
    ("conn.call", [{"client_id": SEED_CLIENT_ID, "func": "close", "args": []}], "conn.call",
     {"c": SEED_CLIENT_ID, "f": "close", "a": []}, 301),
    ("mesh.send", [{"client_id": SEED_CLIENT_ID, "data": "x"}], "mesh.send",
     {"c": SEED_CLIENT_ID, "d": "x"}, 401),
    ("mesh.send", [{"client_id": SEED_CLIENT_ID}], "mesh.send", {"c": SEED_CLIENT_ID}, 101),
    ("mesh.publish", [{"channel": "", "data": "x"}], "mesh.publish", {"c": "", "d": "x"}, 101),
    ("mesh.publish", [{"channel": "c", "data": "x"}], "mesh.publish", {"c": "c", "d": "x"}, 0),
]


@pytest.mark.parametrize("long_method, params, compact_method, p, code", SAME_CODES)
def test_both_dialects_share_the_method(long_method, params, compact_method, p, code) -> None:
    a, b = Engine(), Engine()
    long_reply, compact_reply = long(a, long_method, params), compact(b, compact_method, p)
    assert (long_reply["error"] or {"code": 0})["code"] == code
    assert (compact_reply["E"] or {"c": 0})["c"] == code


# Answers from another engine, and internal errors --------------------------------------------------


def test_remote_answer_is_a_deferred_in_compact() -> None:
    pending: Deferred = Deferred()
    api = Engine(link=FakeLink.answering(lambda: pending))
    reply = api.dispatcher.handle(api.session, json.dumps(
        {"m": "mesh.send", "p": {"c": str(REMOTE_CLIENT_ID), "d": "x"}, "i": 3}).encode())
    assert isinstance(reply, Deferred) and not reply.called
    pending.callback(None)
    assert json.loads(reply.result) == r({"s": True}, 3)


@pytest.mark.parametrize("method, code", [("mesh.send", 401), ("conn.call", 301)])
def test_remote_errors_in_compact(method, code) -> None:
    api = Engine(link=FakeLink.answering(lambda: succeed("mesh timeout")))
    assert_compact_error(compact(api, method, {"c": str(REMOTE_CLIENT_ID), "d": "x", "f": "close"}), code)


def test_remote_publish_is_summed_in_compact() -> None:
    api = Engine(link=FakeLink.answering(lambda: succeed((4, 1))))
    assert compact(api, "mesh.publish", {"c": "c", "d": "x"}) == r({"s": 4, "f": 1, "t": 5})


def test_internal_error_in_compact() -> None:
    api = Engine(link=FakeLink.answering(raise_boom))
    assert_compact_error(compact(api, "mesh.send", {"c": str(REMOTE_CLIENT_ID), "d": "x"}), -32603)


def test_formatting_bug_becomes_an_internal_error(monkeypatch) -> None:
    pending: Deferred = Deferred()
    api = Engine(link=FakeLink.answering(lambda: pending))
    monkeypatch.setattr(type(COMPACT), "result", lambda self, method, result: result["missing"])
    reply = api.dispatcher.handle(api.session, json.dumps(
        {"m": "mesh.send", "p": {"c": str(REMOTE_CLIENT_ID), "d": "x"}, "i": 3}).encode())
    pending.callback(None)
    assert_compact_error(json.loads(reply.result), -32603, 3)


# call(): the entry point of the HTTP API ----------------------------------------------------------


def test_call_returns_the_compact_result(api) -> None:
    api.connect()
    spec = {"c": SEED_CLIENT_ID, "d": "x"}
    assert api.dispatcher.call(api.session, COMPACT, "mesh.send", spec) == {"s": True}
    assert api.dispatcher.call(api.session, COMPACT, "mesh.publish", {"c": "c", "d": "x"}) == {
        "s": 0, "f": 0, "t": 0}


def test_call_raises_api_errors(api) -> None:
    with pytest.raises(ApiError) as e:
        api.dispatcher.call(api.session, COMPACT, "mesh.send", {"c": SEED_CLIENT_ID, "d": "x"})
    assert e.value.code == 401
