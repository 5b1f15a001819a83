"""The test support shipped in ``connmix_tx.testing``, and the rule that test modules stand alone.

The fakes are checked against the interfaces they stand in for (a fake that lags behind its
interface fails here, not in a confusing way elsewhere) and wherever they hold logic.
"""

from __future__ import annotations

import ast
import inspect
import json
import socket
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from connmix_tx.engine.connections import ClientConnection, ClientTransport, ConnectionRegistry
from connmix_tx.engine.mesh_link import MeshLink
from connmix_tx.engine.outbound import buffered_bytes
from connmix_tx.engine.router import LocalOps, MeshPeers, Router
from connmix_tx.lua.convert import py_to_lua
from connmix_tx.testing import (
    FakeClientTransport, FakeLink, FakePeers, FakeSocketTransport, FakeTLS, LogCapture, MemoryEndpoint, Outcome,
    free_port, free_ports, script_engine, tick,
)

TESTS = Path(__file__).resolve().parent


# Test modules stand alone ---------------------------------------------------------------------


def imported_modules(path: Path) -> list[str]:
    """Every module name ``path`` imports (``from . import x`` gives ``.x``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.append(base)
            if not node.module:  # from . import test_x
                names += [base + alias.name for alias in node.names]
    return names


def is_test_module(name: str) -> bool:
    return any(part.startswith("test_") for part in name.lstrip(".").split("."))


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = {
        path.name: bad for path in sorted(TESTS.glob("*.py"))
        if (bad := [name for name in imported_modules(path) if is_test_module(name)])
    }
    assert offenders == {}, "move shared helpers into connmix_tx.testing or a helper module under tests/"


@pytest.mark.parametrize("source, found", [
    ("from test_limits import LogCapture", ["test_limits"]),
    ("from tests.test_http_api import post", ["tests.test_http_api"]),
    ("import test_cluster", ["test_cluster"]),
    ("from test_socket_server.helpers import lost", ["test_socket_server.helpers"]),
    ("from . import test_reload", ["test_reload"]),
    ("from procs import free_ports\nimport testing_tools", []),
])
def test_the_import_rule_sees_every_form(tmp_path: Path, source: str, found: list[str]) -> None:
    path = tmp_path / "test_sample.py"
    path.write_text(source)
    assert [name.lstrip(".") for name in imported_modules(path) if is_test_module(name)] == found


def test_the_package_does_not_import_tests() -> None:
    package = TESTS.parent / "connmix_tx" / "testing"
    for path in package.glob("*.py"):
        for name in imported_modules(path):
            assert not name.startswith(("tests", "conftest", "test_")), (path.name, name)


# Fakes match their interfaces -----------------------------------------------------------------


def protocol_methods(protocol: type) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize("fake, interface", [
    (FakeClientTransport, ClientTransport),
    (FakePeers, MeshPeers),
    (FakeLink, MeshLink),
])
def test_fakes_have_the_methods_and_parameters_of_their_interface(fake: type, interface: type) -> None:
    names = protocol_methods(interface) if interface is not MeshLink else ["send", "call", "publish"]
    assert names
    for name in names:
        real = list(inspect.signature(getattr(interface, name)).parameters)
        assert list(inspect.signature(getattr(fake, name)).parameters) == real, name


# FakeClientTransport --------------------------------------------------------------------------


def test_client_transport_records_what_it_accepts() -> None:
    transport = FakeClientTransport()
    shared: dict = {}
    assert transport.send_message(b"own", False) is None
    assert transport.deliver(b"a", False, shared) is None
    assert transport.deliver(b"\x00", True, shared) is None
    assert transport.sent == [(b"own", False)]
    assert transport.delivered == [(b"a", False), (b"\x00", True)]
    assert transport.payloads == [b"a", b"\x00"]
    assert transport.shared == [shared, shared]
    assert not transport.closed and transport.clear_buffer() is None and transport.clears == 1
    transport.close_connection()
    transport.close_connection()
    assert transport.closed and transport.closes == 2


def test_a_refusing_client_transport_records_nothing_but_the_shared_dict() -> None:
    transport = FakeClientTransport("slow consumer", clear_error="not supported")
    assert transport.send_message(b"x", False) == "slow consumer"
    assert transport.deliver(b"x", False, {}) == "slow consumer"
    assert transport.clear_buffer() == "not supported"
    assert transport.sent == transport.delivered == [] and len(transport.shared) == 1


def test_client_transport_behind_the_router() -> None:
    registry = ConnectionRegistry()
    good, slow = FakeClientTransport(), FakeClientTransport("slow consumer")
    for client_id, transport in ((1, good), (2, slow)):
        conn = ClientConnection(client_id, "203.0.113.9:5000", transport)
        conn.ready = True
        registry.add(conn)
        registry.subscribe(conn, ["room"])
    router = Router(0, LocalOps(registry))
    assert router.publish("room", b"news", False) == (1, 1)
    assert good.payloads == [b"news"] and slow.payloads == []
    assert good.shared[0] is slow.shared[0]  # one shared dict per fan-out


# FakeLink and FakePeers -----------------------------------------------------------------------


def fired(d: Deferred) -> list:
    got: list = []
    d.addBoth(got.append)
    return got


def test_link_answers_values_and_records_calls() -> None:
    pending: Deferred = Deferred()
    link = FakeLink(send=pending, call="client 1 not found", publish=(3, 1))
    assert link.send(7, b"x", True) is pending
    assert link.call(7, "close", []) == "client 1 not found"
    assert fired(link.publish("room", b"y", False)) == [(3, 1)]  # wrapped as the real link's Deferred
    assert link.calls == [("send", 7, b"x", True), ("call", 7, "close", []), ("publish", "room", b"y", False)]


def test_link_calls_callable_answers_per_request() -> None:
    answers = iter([succeed(None), succeed("mesh timeout")])
    link = FakeLink.answering(lambda: next(answers))
    assert fired(link.send(1, b"a", False)) == [None]
    assert fired(link.call(1, "close", [])) == ["mesh timeout"]

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        FakeLink.answering(boom).publish("room", b"x", False)


def test_peers_by_number() -> None:
    link = FakeLink()
    peers = FakePeers({5: link})
    assert peers.link_for(5) is link and peers.link_for(4) is None and peers.links() == [link]
    assert FakePeers().links() == []


# LogCapture -----------------------------------------------------------------------------------


def test_log_capture_sees_only_what_is_logged_while_open() -> None:
    log = Logger(namespace="connmix.sample")
    log.info("before {n}", n=0)
    with LogCapture() as logs:
        log.info("hello {name}", name="world")
        log.error("broken {n}", n=1)
        Logger(namespace="connmix.other").warn("elsewhere")
        log.info("")  # an event without a message
    log.info("after")
    assert logs.lines == ["hello world", "broken 1", "elsewhere"]
    assert logs.texts("connmix.sample") == ["hello world", "broken 1", ""]
    assert logs.texts(level=LogLevel.error) == ["broken 1"]
    assert logs.find("world") == ["hello world"] and logs.find("after") == []
    assert len(logs.events) == 4


# FakeSocketTransport and FakeTLS --------------------------------------------------------------


def test_socket_transport_queue_moves_only_when_the_kernel_takes() -> None:
    transport = FakeSocketTransport()
    transport.write(b"x" * 10)
    transport.writeSequence([b"ab", b"cd"])
    assert transport.value() == b"x" * 10 + b"abcd"  # everything written, as StringTransport
    assert transport.queued == buffered_bytes(transport) == 14
    transport.take(4)
    assert buffered_bytes(transport) == 10
    transport.take(100)
    assert buffered_bytes(transport) == 0
    transport.take(1)  # nothing left: nothing happens
    assert buffered_bytes(transport) == 0


def test_socket_transport_behind_tls_and_abort() -> None:
    inner = FakeSocketTransport()
    inner.write(b"123456")
    assert buffered_bytes(FakeTLS(inner)) == 6 + 3
    assert buffered_bytes(FakeTLS(inner, pending=())) == 6
    assert not inner.aborted
    inner.abortConnection()
    assert inner.aborted and inner.disconnecting


# MemoryEndpoint and tick ----------------------------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def test_memory_endpoint_joins_a_client_to_the_server_factory() -> None:
    endpoint = MemoryEndpoint(Factory.forProtocol(Echo), Clock())
    client = fired(endpoint.connect(Factory.forProtocol(Collect)))[0]
    client.transport.write(b"ping")
    assert client.received == b""  # nothing moves until pumped
    endpoint.flush()
    assert client.received == b"ping" and endpoint.attempts == 1
    endpoint.lose()
    assert client.lost


def test_memory_endpoint_refuses_or_hangs_on_demand() -> None:
    endpoint = MemoryEndpoint(Factory.forProtocol(Echo), Clock())
    endpoint.refuse = True
    failure = fired(endpoint.connect(Factory.forProtocol(Collect)))[0]
    assert failure.check(ConnectionRefusedError)
    endpoint.refuse, endpoint.hang = False, True
    assert fired(endpoint.connect(Factory.forProtocol(Collect))) == []
    assert endpoint.attempts == 2 and endpoint.pumps == []


def test_tick_advances_the_clock_in_steps_and_flushes_between() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(Factory.forProtocol(Echo), clock)
    client = fired(endpoint.connect(Factory.forProtocol(Collect)))[0]
    clock.callLater(0.6, client.transport.write, b"late")
    tick(clock, 1.0, [endpoint])
    assert clock.seconds() == 1.0 and client.received == b"late"


# free_ports -----------------------------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [*ports, free_port()]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# script_engine --------------------------------------------------------------------------------


def test_the_shipped_entry_script_under_script_engine() -> None:
    """What a user does to test an entry script: the default one queues each message with its context."""
    engine = script_engine(TESTS.parent / "lua" / "entry.websocket.lua")
    conn, transport = engine.connect()
    headers = py_to_lua(engine.script.runtime, {"x-user": "ann"})
    assert engine.run("on_handshake", conn, conn.cid, headers, engine.script.table({})).values == (None,)
    assert engine.message(conn, "hello").values == (None,)
    assert engine.message(conn, b"\x00\xff", b"binary").values == (None,)
    (_, first), (_, second) = engine.queues.topics["foo"].messages
    assert json.loads(first) == {"msg": {"type": "text", "data": "hello", "finish": True},
                                 "ctx": {"headers": {"x-user": "ann"}}}
    assert json.loads(second)["msg"]["data"] == "AP8="  # base64 of the binary message
    assert transport.sent == []


def test_outcome_tells_values_from_errors(tmp_path: Path) -> None:
    entry = tmp_path / "lua" / "entry.lua"
    entry.parent.mkdir()
    entry.write_text("function on_handshake() end\nfunction on_close() end\n"
                     "function on_message(msg) if msg.data == 'bad' then error('no') end return 1, 'two' end\n")
    engine = script_engine(entry)
    conn, _ = engine.connect()
    good, bad = engine.message(conn, "ok"), engine.message(conn, "bad")
    assert good.finished and good.values == (1, b"two")
    assert bad.error.endswith("lua/entry.lua:3: no")
    with pytest.raises(AssertionError):
        bad.values  # noqa: B018
    assert not Outcome().finished
