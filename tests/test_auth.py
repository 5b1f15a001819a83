"""Tests for connmix_tx.auth and the role checks of the API dispatcher (docs/api.md,
"Authentication and roles"; SIGHUP).

``AccessControl`` is plain Python and tested as such: a matrix of peers, credentials, users,
host globs and roles.  ``AccessGuard`` is driven with Twisted's ``DummyRequest`` (a peer that is
not loopback cannot be produced by the integration tests on this machine).  The dispatcher's
per-request role checks use the harness of test_api_dispatch.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from apihelpers import SEED_CLIENT_ID, Engine
from connmix_tx import auth
from connmix_tx.auth import (
    PROTECTED_BODY, UNAUTHORIZED_BODY, AccessControl, AccessGuard, basic_credentials, is_loopback,
    request_user,
)
from connmix_tx.config import AccessConfig, UserConfig
from connmix_tx.engine.api import ApiDispatcher

ALICE = UserConfig("alice", "s3cret", ("read", "write"), "*")
BOB = UserConfig("bob", "b0b:with:colons", ("read",), "*")
CAROL = UserConfig("carol", "carol-pw", ("read", "write"), "10.1.*")
DAVE = UserConfig("dave", "", (), "*")  # no role at all, empty password
USERS = AccessConfig(users=(ALICE, BOB, CAROL, DAVE), protected=True)
PROTECTED = AccessConfig(users=(), protected=True)
OPEN = AccessConfig(users=(), protected=False)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def query(username: str, password: str) -> dict[str, list[str]]:
    return {"username": [username], "password": [password]}


# Protected mode and protected: false ---------------------------------------------------------------


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1", None])
def test_protected_mode_admits_loopback_and_local_peers(peer) -> None:
    verdict = AccessControl(PROTECTED).check(peer, None)
    assert verdict == (None, 200, b"") and verdict.admitted


@pytest.mark.parametrize("peer", ["10.1.2.3", "192.168.0.1", "::ffff:10.1.2.3", "2001:db8::1", "garbage", ""])
def test_protected_mode_refuses_other_peers(peer) -> None:
    verdict = AccessControl(PROTECTED).check(peer, basic("alice", "s3cret"), query("alice", "s3cret"))
    assert verdict.status == 403 and not verdict.admitted and verdict.headers == {}
    assert json.loads(verdict.body) == {
        "E": {"c": -32001, "m": "protected mode: configure access.users or set access.protected: false"},
        "r": None,
    }
    assert verdict.body == PROTECTED_BODY


@pytest.mark.parametrize("peer", ["10.1.2.3", "127.0.0.1", "2001:db8::1"])
def test_protected_false_admits_anyone(peer) -> None:
    assert AccessControl(OPEN).check(peer, None) == (None, 200, b"")


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("localhost")


# Users: credentials ---------------------------------------------------------------------------------


def assert_unauthorized(verdict: Any) -> None:
    assert verdict.status == 401 and verdict.user is None
    assert verdict.headers == {"WWW-Authenticate": 'Basic realm="connmix"'}
    assert json.loads(verdict.body) == {"E": {"c": -32001, "m": "unauthorized"}, "r": None}
    assert verdict.body == UNAUTHORIZED_BODY


@pytest.mark.parametrize(
    "authorization",
    [None, "", basic("alice", "wrong"), basic("alice", "S3CRET"), basic("nobody", "s3cret"),
     basic("alice", ""),
     basic("Alice", "s3cret"), "Basic not-base64!", "Basic " + base64.b64encode(b"no-colon").decode(),
     "Basic " + base64.b64encode(b"alice:\xff").decode(), "Bearer abc", basic("bob", "b0b")],
)
def test_missing_or_wrong_credentials(authorization) -> None:
    assert_unauthorized(AccessControl(USERS).check("127.0.0.1", authorization))


@pytest.mark.parametrize("peer", ["127.0.0.1", "10.1.2.3", "2001:db8::1", None])
def test_users_mode_needs_credentials_even_from_loopback(peer) -> None:
    assert_unauthorized(AccessControl(USERS).check(peer, None))


@pytest.mark.parametrize("user", [ALICE, BOB])
def test_basic_credentials_admit_the_user(user) -> None:
    verdict = AccessControl(USERS).check("10.9.9.9", basic(user.username, user.password))
    assert verdict == (user, 200, b"")


def test_basic_scheme_is_case_insensitive_and_password_may_hold_colons() -> None:
    token = base64.b64encode(b"bob:b0b:with:colons").decode()
    assert basic_credentials("basic " + token) == ("bob", "b0b:with:colons")
    assert AccessControl(USERS).check("127.0.0.1", "BASIC " + token).user == BOB


def test_query_credentials() -> None:
    access = AccessControl(USERS)
    assert access.check("127.0.0.1", None, query("alice", "s3cret")).user == ALICE
    assert_unauthorized(access.check("127.0.0.1", None, query("alice", "nope")))
    assert_unauthorized(access.check("127.0.0.1", None, {"username": ["alice"]}))
    assert_unauthorized(access.check("127.0.0.1", None, {}))


def test_basic_header_wins_over_the_query() -> None:
    access = AccessControl(USERS)
    assert access.check("127.0.0.1", basic("bob", BOB.password), query("alice", "s3cret")).user == BOB
    assert_unauthorized(access.check("127.0.0.1", basic("bob", "wrong"), query("alice", "s3cret")))


def test_passwords_are_compared_in_constant_time_against_every_user(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    AccessControl(USERS).check("127.0.0.1", basic("alice", "s3cret"))
    # Name and password of each of the four users, even after alice matched.
    assert len(calls) == 8 and (b"s3cret", b"s3cret") in calls and (b"carol-pw", b"s3cret") in calls


# Users: host globs and roles -----------------------------------------------------------------------


@pytest.mark.parametrize("peer, status", [("10.1.2.3", 200), ("10.1.255.0", 200), ("::ffff:10.1.2.3", 200),
                                          ("10.2.0.1", 403), ("127.0.0.1", 403), ("2001:db8::1", 403)])
def test_host_glob(peer, status) -> None:
    verdict = AccessControl(USERS).check(peer, basic("carol", "carol-pw"))
    assert verdict.status == status
    if status == 403:
        assert verdict.user is None and json.loads(verdict.body)["E"]["c"] == -32001


def test_wrong_password_from_the_wrong_host_is_401_not_403() -> None:
    assert_unauthorized(AccessControl(USERS).check("10.2.0.1", basic("carol", "nope")))


def test_a_user_without_the_read_role_cannot_open_anything() -> None:
    verdict = AccessControl(USERS).check("127.0.0.1", basic("dave", ""))
    assert verdict.status == 403 and json.loads(verdict.body)["E"]["c"] == -32001


@pytest.mark.parametrize(
    "config, username, role, allowed",
    [(USERS, "alice", "read", True), (USERS, "alice", "write", True), (USERS, "bob", "read", True),
     (USERS, "bob", "write", False), (USERS, "dave", "read", False), (USERS, "nobody", "read", False),
     (USERS, None, "read", False), (PROTECTED, None, "write", True), (OPEN, None, "write", True),
     (PROTECTED, "alice", "write", True)],
)
def test_allows(config, username, role, allowed) -> None:
    assert AccessControl(config).allows(username, role) is allowed


def test_replace_applies_to_the_next_check_and_role_lookup() -> None:
    access = AccessControl(USERS)
    bob_writer = UserConfig("bob", "new", ("read", "write"), "*")
    access.replace(AccessConfig(users=(bob_writer,), protected=True))
    assert access.allows("bob", "write") and not access.allows("alice", "read")
    assert_unauthorized(access.check("127.0.0.1", basic("alice", "s3cret")))
    assert access.check("127.0.0.1", basic("bob", "new")).user == bob_writer
    access.replace(PROTECTED)
    assert access.check("127.0.0.1", None).admitted and access.allows("bob", "write")


# The protected-mode warning -----------------------------------------------------------------------


def warnings_of(action: Any) -> list[str]:
    with capturedLogs() as events:
        action()
    return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]


def test_open_listener_on_a_public_address_warns_once() -> None:
    access = AccessControl(OPEN)
    assert warnings_of(lambda: access.add_listener("api", "0.0.0.0", 6789)) == [
        "access.users is empty: the api server on 0.0.0.0:6789 accepts anyone"]
    assert warnings_of(lambda: access.add_listener("center api", "10.0.0.5", 6787)) == [
        "access.users is empty: the center api server on 10.0.0.5:6787 accepts anyone"]


@pytest.mark.parametrize("config, bind", [(OPEN, "127.0.0.1"), (OPEN, "::1"), (PROTECTED, "0.0.0.0"),
                                          (USERS, "0.0.0.0"),
                                          (AccessConfig(users=(ALICE,), protected=False), "::")])
def test_no_warning(config, bind) -> None:
    assert warnings_of(lambda: AccessControl(config).add_listener("api", bind, 6789)) == []


def test_a_reload_that_opens_the_listeners_warns_again() -> None:
    access = AccessControl(PROTECTED)
    access.add_listener("api", "0.0.0.0", 6789)
    access.add_listener("center api", "127.0.0.1", 6787)
    assert len(warnings_of(lambda: access.replace(OPEN))) == 1
    assert warnings_of(lambda: access.replace(OPEN)) == []  # already open: said once


# AccessGuard ----------------------------------------------------------------------------------------


class Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"inner:" + str(request_user(request)).encode()


def guarded(config: AccessConfig) -> AccessGuard:
    root = Resource()
    root.putChild(b"ws", Leaf())
    return AccessGuard(root, AccessControl(config), query_paths=[b"/ws"])


def serve(guard: AccessGuard, uri: bytes, client: Any, authorization: str | None = None) -> tuple[Any, bytes]:
    path = uri.partition(b"?")[0]
    request = DummyRequest(path.split(b"/")[1:])
    request.uri, request.path, request.client = uri, path, client
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization.encode()])
    resource = getChildForRequest(guard, request)
    return request, resource.render(request)


PUBLIC = IPv4Address("TCP", "10.1.2.3", 5555)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 5555)


def test_guard_protected_mode_refuses_a_public_peer() -> None:
    request, body = serve(guarded(PROTECTED), b"/ws", PUBLIC)
    assert request.responseCode == 403 and body == PROTECTED_BODY
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


@pytest.mark.parametrize("client", [LOOPBACK, IPv6Address("TCP", "::1", 5555), UNIXAddress(b"/tmp/api.sock")])
def test_guard_protected_mode_admits_local_peers(client) -> None:
    assert serve(guarded(PROTECTED), b"/ws", client)[1] == b"inner:None"


def test_guard_protected_mode_refuses_an_unknown_kind_of_peer() -> None:
    assert serve(guarded(PROTECTED), b"/ws", None)[0].responseCode == 403  # DummyRequest: NullAddress


def test_guard_401_has_the_challenge() -> None:
    request, body = serve(guarded(USERS), b"/ws", LOOPBACK)
    assert request.responseCode == 401 and body == UNAUTHORIZED_BODY
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [b'Basic realm="connmix"']


def test_guard_refuses_unknown_paths_too() -> None:
    request, body = serve(guarded(USERS), b"/nothing/here", LOOPBACK)
    assert request.responseCode == 401


def test_guard_passes_the_user_on() -> None:
    assert serve(guarded(USERS), b"/ws", PUBLIC, basic("alice", "s3cret"))[1] == b"inner:alice"
    assert serve(guarded(USERS), b"/ws?username=bob&password=b0b%3Awith%3Acolons", PUBLIC)[1] == b"inner:bob"


def test_guard_accepts_query_credentials_only_on_the_query_paths() -> None:
    guard = guarded(USERS)
    guard.inner.putChild(b"other", Leaf())
    request, _ = serve(guard, b"/other?username=alice&password=s3cret", LOOPBACK)
    assert request.responseCode == 401


def test_guard_host_glob() -> None:
    assert serve(guarded(USERS), b"/ws", PUBLIC, basic("carol", "carol-pw"))[1] == b"inner:carol"
    request, _ = serve(guarded(USERS), b"/ws", LOOPBACK, basic("carol", "carol-pw"))
    assert request.responseCode == 403


# Roles per request in the dispatcher -----------------------------------------------------------------


def engine_with(config: AccessConfig, user: str | None) -> tuple[Engine, AccessControl]:
    engine = Engine()
    access = AccessControl(config)
    engine.dispatcher = ApiDispatcher(engine.dispatcher.router, engine.queues, access)
    engine.session.user = user
    return engine, access


WRITE_REQUESTS = [
    ("queue.consume", ["foo"], "queue.pop", ["foo"]),
    ("queue.unconsume", [], "queue.unpop", []),
    ("conn.call", [{"client_id": str(SEED_CLIENT_ID), "func": "close", "args": []}], "conn.call",
     {"c": str(SEED_CLIENT_ID), "f": "close", "a": []}),
    ("mesh.send", [{"client_id": str(SEED_CLIENT_ID), "data": "x"}], "mesh.send",
     {"c": str(SEED_CLIENT_ID), "d": "x"}),
    ("mesh.publish", [{"channel": "c", "data": "x"}], "mesh.publish", {"c": "c", "d": "x"}),
]


@pytest.mark.parametrize("long_name, params, compact_name, p", WRITE_REQUESTS)
def test_read_only_user_gets_32001_for_write_methods(long_name, params, compact_name, p) -> None:
    engine, _ = engine_with(USERS, "bob")
    conn = engine.connect()
    reply = engine.request(long_name, params)
    assert reply["error"]["code"] == -32001 and reply["id"] == 12345
    reply = engine.handle(json.dumps({"m": compact_name, "p": p, "i": 5}).encode())
    assert reply["E"]["c"] == -32001 and reply["r"] is None and reply["i"] == 5
    assert not conn.transport.closed and conn.transport.delivered == [] and engine.queues.topics == {}


def test_permission_is_checked_before_the_params() -> None:
    engine, _ = engine_with(USERS, "bob")
    assert engine.request("mesh.send", [{"nonsense": True}])["error"]["code"] == -32001


def test_read_only_user_may_ping() -> None:
    engine, _ = engine_with(USERS, "bob")
    assert engine.request("server.ping")["result"] == {"status": "server.pong"}
    assert engine.handle(b'{"m":"server.ping","i":1}')["r"] == {"m": "server.pong"}


@pytest.mark.parametrize("config, user", [(USERS, "alice"), (PROTECTED, None), (OPEN, None)])
def test_writers_may_write(config, user) -> None:
    engine, _ = engine_with(config, user)
    assert engine.request("queue.consume", ["foo"])["result"] == {"success": True}
    assert engine.handle(b'{"m":"mesh.publish","p":{"c":"c","d":"x"},"i":1}')["r"] == {"s": 0, "f": 0, "t": 0}


def test_roles_are_looked_up_again_at_each_request() -> None:
    engine, access = engine_with(USERS, "alice")
    assert engine.request("queue.consume", ["foo"])["result"] == {"success": True}
    alice_reader = UserConfig("alice", "s3cret", ("read",), "*")
    access.replace(AccessConfig(users=(alice_reader,), protected=True))
    assert engine.request("queue.unconsume")["error"]["code"] == -32001
    assert engine.request("server.ping")["result"] == {"status": "server.pong"}
    access.replace(AccessConfig(users=(BOB,), protected=True))  # alice removed
    assert engine.request("server.ping")["error"]["code"] == -32001
    access.replace(USERS)
    assert engine.request("queue.unconsume")["result"] == {"success": True}


# Cross-site requests (a web page of another origin driving the API) -------------------------


def _guarded_request(path: bytes, headers: dict[bytes, bytes], users: bool = False) -> tuple[int, bytes]:
    from twisted.web.test.requesthelper import DummyRequest

    from connmix_tx.auth import AccessControl, AccessGuard
    from connmix_tx.config import AccessConfig, UserConfig
    from connmix_tx.web import JsonGet

    config = AccessConfig(
        users=(UserConfig("alice", "pw", ("read", "write"), "*"),) if users else (), protected=True
    )
    guard = AccessGuard(JsonGet(lambda: {"ok": True}), AccessControl(config), query_paths=[b"/ws/v1"])
    from twisted.internet.address import IPv4Address

    plain, _, _ = path.partition(b"?")
    request = DummyRequest(plain.lstrip(b"/").split(b"/"))
    request.client = IPv4Address("TCP", "127.0.0.1", 50000)
    request.path = plain
    request.uri = path
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name, value)
    body = guard.render(request)
    return request.responseCode or 200, body


def test_pages_of_other_sites_are_refused_without_users() -> None:
    status, body = _guarded_request(b"/ws/v1", {b"origin": b"https://evil.example", b"host": b"127.0.0.1:6789"})
    assert status == 403 and b"cross-origin request refused" in body


def test_same_origin_pages_and_tools_without_origin_are_admitted() -> None:
    assert _guarded_request(b"/ws/v1", {b"origin": b"http://127.0.0.1:6789", b"host": b"127.0.0.1:6789"})[0] == 200
    assert _guarded_request(b"/ws/v1", {b"host": b"127.0.0.1:6789"})[0] == 200


def test_cross_site_needs_explicit_query_credentials_not_cached_basic() -> None:
    import base64

    basic = b"Basic " + base64.b64encode(b"alice:pw")
    headers = {b"origin": b"https://app.example", b"host": b"127.0.0.1:6789", b"authorization": basic}
    assert _guarded_request(b"/ws/v1", headers, users=True)[0] == 403
    explicit = {b"origin": b"https://app.example", b"host": b"127.0.0.1:6789"}
    assert _guarded_request(b"/ws/v1?username=alice&password=pw", explicit, users=True)[0] == 200
