"""Tests for connmix_tx.center: node numbers, heartbeats, and the PB registry (docs/operations.md,
"The cluster"; docs/api.md, "The center API").

The PB tests join a real ``registry_factory`` server and a ``PBClientFactory`` client in memory
with ``twisted.test.iosim``: no sockets, no reactor.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.test import iosim

from connmix_tx.center.pb import registry_factory
from connmix_tx.pb import GuardedPBServerFactory
from connmix_tx.center.registry import Registry, RegistryError

SECRET = "s3cret"
PEER = IPv4Address("TCP", "10.0.0.7", 40000)


def info(number: int | None = None, host: str | None = "10.0.0.1") -> dict[str, Any]:
    values: dict[str, Any] = {"api_server_port": 6789, "mesh_point_port": 6788, "version": "0.1.0"}
    if host is not None:
        values["advertise_host"] = host
    if number is not None:
        values["number"] = number
    return values


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(clock, heartbeat_timeout=15, number_reserve=60)


def numbers(registry: Registry) -> dict[str, int]:
    return {r.node_id: r.number for r in registry.nodes()}


# Numbers -------------------------------------------------------------------------------------


def test_lowest_free_number(registry) -> None:
    assert [registry.register(n, info(), "p").number for n in "abc"] == [0, 1, 2]
    assert registry.register("a", info(), "p").number == 0  # live re-registration keeps it


def test_number_reserved_after_drop_then_freed(clock, registry) -> None:
    for name in "abc":
        registry.register(name, info(), "p")
    registry.drop("b", "test")
    assert registry.register("d", info(), "p").number == 3  # 1 is reserved for b
    clock.advance(59)
    assert registry.register("e", info(), "p").number == 4
    clock.advance(1)
    assert registry.register("f", info(), "p").number == 1


def test_same_node_reclaims_its_reserved_number(clock, registry) -> None:
    registry.register("a", info(), "p")
    registry.register("b", info(), "p")
    registry.drop("a", "test")
    clock.advance(30)
    assert registry.register("a", info(number=0), "p").number == 0
    assert registry.register("c", info(), "p").number == 2


def test_claimed_number_conflicts(clock, registry) -> None:
    registry.register("a", info(), "p")
    registry.register("b", info(), "p")
    with pytest.raises(RegistryError, match="held by a"):
        registry.register("x", info(number=0), "p")
    registry.drop("b", "test")
    with pytest.raises(RegistryError, match="reserved for b"):
        registry.register("x", info(number=1), "p")
    for bad in (-1, 1024):
        with pytest.raises(RegistryError):
            registry.register("x", info(number=bad), "p")
    assert "x" not in registry.engines
    clock.advance(60)
    assert registry.register("x", info(number=1), "p").number == 1  # the reservation expired


def test_empty_center_accepts_claimed_numbers(registry) -> None:
    assert registry.register("seven", info(number=7), "p").number == 7
    assert registry.register("two", info(number=2), "p").number == 2
    assert registry.register("new", info(), "p").number == 0
    assert [r["id"] for r in registry.describe()] == ["new", "two", "seven"]


def test_1024_engines_at_most(registry) -> None:
    for i in range(1024):
        assert registry.register(f"n{i}", info(), "p").number == i
    with pytest.raises(RegistryError, match="no free node number"):
        registry.register("one-too-many", info(), "p")


# Heartbeats, sweep, describe ------------------------------------------------------------------


def test_heartbeat_updates_the_record(clock, registry) -> None:
    registry.register("a", info(), "p")
    clock.advance(5)
    assert registry.heartbeat("a", {"clients": 3, "channels": 2})
    record = registry.engines["a"]
    assert (record.last_seen, record.clients, record.channels) == (5, 3, 2)
    assert not registry.heartbeat("unknown", {})


def test_sweep_drops_silent_engines_after_the_timeout(clock, registry) -> None:
    changes: list[list[str]] = []
    registry.on_change = lambda: changes.append(sorted(registry.engines))
    registry.start(5)
    registry.register("alive", info(), "p")
    registry.register("silent", info(), "p")
    for _ in range(3):
        clock.advance(5)
        registry.heartbeat("alive", {})
    assert set(registry.engines) == {"alive", "silent"}  # 15 s silent is not more than 15 s
    clock.advance(5)
    assert set(registry.engines) == {"alive"}
    assert changes[-1] == ["alive"]
    assert not registry.heartbeat("silent", {})
    assert registry.register("late", info(), "p").number == 2  # 1 stays reserved
    registry.stop()
    assert clock.getDelayedCalls() == []


def test_describe_fields_and_order(clock, registry) -> None:
    clock.advance(1_764_097_293.6)
    registry.register("second", info(number=4), "192.0.2.1")
    registry.register("first", info(host=None), "192.0.2.9")
    clock.advance(60)
    registry.heartbeat("first", {"clients": 1, "channels": 0})
    registry.register("first", info(number=0, host=None), "192.0.2.9")  # keeps registered_at
    assert registry.describe() == [
        {"id": "first", "number": 0, "api_server": "192.0.2.9:6789", "mesh_point": "192.0.2.9:6788",
         "host": "192.0.2.9", "version": "0.1.0", "clients": 0, "channels": 0,
         "registered_at": 1764097293, "last_seen": 1764097353, "engine": "first", "worker": 0},
        {"id": "second", "number": 4, "api_server": "10.0.0.1:6789", "mesh_point": "10.0.0.1:6788",
         "host": "10.0.0.1", "version": "0.1.0", "clients": 0, "channels": 0,
         "registered_at": 1764097293, "last_seen": 1764097293, "engine": "second", "worker": 0},
    ]


def test_drop_by_a_stale_connection_is_ignored(registry) -> None:
    old, new = object(), object()
    registry.register("a", info(), "p", mind=old)
    registry.register("a", info(number=0), "p", mind=new)
    registry.drop("a", "old connection lost", old)
    assert "a" in registry.engines
    registry.drop("a", "connection lost", new)
    assert "a" not in registry.engines


# PB, in memory -------------------------------------------------------------------------------


class Mind(pb.Referenceable):
    """What an engine gives the center: it receives node lists."""

    def __init__(self) -> None:
        self.pushes: list[list[dict]] = []

    def remote_nodes(self, nodes: list) -> None:
        self.pushes.append(nodes)


class EngineClient:
    """One engine logged in to ``factory`` over an in-memory PB connection."""

    def __init__(self, factory: pb.PBServerFactory, password: str = SECRET, user: bytes = b"engine") -> None:
        self.mind = Mind()
        self.client_factory = pb.PBClientFactory()
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(PEER),
            lambda: self.client_factory.buildProtocol(None),
            serverTransportFactory=lambda proto: iosim.FakeTransport(proto, isServer=True, peerAddress=PEER),
        )
        login = self.client_factory.login(UsernamePassword(user, password.encode()), self.mind)
        self.avatar = self.wait(login)

    def wait(self, d: Deferred) -> Any:
        """Pump until ``d`` fired; return its result (or Failure)."""
        results: list = []
        d.addBoth(results.append)
        self.pump.flush()
        assert results, "no answer"
        return results[0]

    def remote(self, method: str, *args: Any) -> Any:
        return self.wait(self.avatar.callRemote(method, *args))

    def disconnect(self) -> None:
        self.client_factory.disconnect()
        self.pump.flush()


@pytest.fixture
def factory(registry: Registry) -> pb.PBServerFactory:
    return registry_factory(registry, SECRET)


def test_register_and_heartbeat_over_pb(registry, factory) -> None:
    engine = EngineClient(factory)
    assert engine.remote("heartbeat", {"clients": 1}) is False  # not registered yet
    answer = engine.remote("register", "c8u7jfbin5659oh0b13g", info(host=None))
    assert answer["number"] == 0
    assert [n["id"] for n in answer["nodes"]] == ["c8u7jfbin5659oh0b13g"]
    assert answer["nodes"][0]["api_server"] == "10.0.0.7:6789"  # the peer address the center saw
    assert engine.remote("heartbeat", {"clients": 4, "channels": 2}) is True
    assert registry.engines["c8u7jfbin5659oh0b13g"].clients == 4


def test_node_lists_are_pushed_to_every_mind(registry, factory) -> None:
    a, b = EngineClient(factory), EngineClient(factory)
    a.remote("register", "a", info())
    b.remote("register", "b", info())
    a.pump.flush()
    assert [[n["id"] for n in push] for push in a.mind.pushes] == [["a"], ["a", "b"]]
    assert [n["id"] for n in b.mind.pushes[-1]] == ["a", "b"]
    b.disconnect()
    a.pump.flush()
    assert [n["id"] for n in a.mind.pushes[-1]] == ["a"]


def test_disconnect_drops_the_engine_and_reserves_its_number(registry, factory) -> None:
    a = EngineClient(factory)
    a.remote("register", "a", info())
    a.disconnect()
    assert registry.engines == {}
    b = EngineClient(factory)
    assert b.remote("register", "b", info())["number"] == 1
    again = EngineClient(factory)
    assert again.remote("register", "a", info(number=0))["number"] == 0


def test_stale_connection_closing_keeps_the_new_registration(registry, factory) -> None:
    old, new = EngineClient(factory), EngineClient(factory)
    old.remote("register", "a", info())
    new.remote("register", "a", info(number=0))
    old.disconnect()
    assert numbers(registry) == {"a": 0}


def test_refused_registration_is_a_remote_error(registry, factory) -> None:
    EngineClient(factory).remote("register", "a", info())
    refused = EngineClient(factory).remote("register", "b", info(number=0))
    assert isinstance(refused, Failure) and refused.check(pb.Error)
    assert "held by a" in refused.getErrorMessage()


@pytest.mark.parametrize("user, password", [(b"engine", "wrong"), (b"engine", ""), (b"mesh", SECRET)])
def test_wrong_credentials_are_refused(registry, factory, user, password) -> None:
    refused = EngineClient(factory, password=password, user=user).avatar
    assert isinstance(refused, Failure) and "login refused" in refused.getErrorMessage()
    assert registry.engines == {}


# The loopback guard --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["10.0.0.7", "192.0.2.1", "0.0.0.0"])
def test_empty_secret_refuses_other_hosts(registry, host) -> None:
    factory = registry_factory(registry, "")
    assert isinstance(factory, GuardedPBServerFactory)
    assert factory.buildProtocol(IPv4Address("TCP", host, 5000)) is None


@pytest.mark.parametrize("host", ["::ffff:10.0.0.7", "fe80::1%eth0", "2001:db8::1", "::"])
def test_empty_secret_refuses_other_ipv6_hosts(registry, host) -> None:
    """A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6: only mapped loopback passes."""
    assert registry_factory(registry, "").buildProtocol(IPv6Address("TCP", host, 5000)) is None


@pytest.mark.parametrize(
    "address",
    [IPv4Address("TCP", "127.0.0.1", 5000), IPv4Address("TCP", "127.8.9.1", 1),
     IPv6Address("TCP", "::1", 5000), IPv6Address("TCP", "::1%lo", 5000),
     IPv6Address("TCP", "::ffff:127.0.0.1", 5000)],
)
def test_empty_secret_accepts_loopback(registry, address) -> None:
    assert isinstance(registry_factory(registry, "").buildProtocol(address), pb.Broker)


def test_a_secret_opens_the_registry_to_all(registry) -> None:
    assert isinstance(registry_factory(registry, SECRET).buildProtocol(PEER), pb.Broker)


def test_workers_of_one_engine_share_the_engine_id(clock, registry) -> None:
    """A multi-process engine: every worker is its own node, marked with its engine and index."""
    registry.register("w0", {**info(), "engine": "eng", "worker": 0}, "127.0.0.1")
    registry.register("w1", {**info(), "engine": "eng", "worker": 1}, "127.0.0.1")
    registry.register("alone", info(), "127.0.0.1")
    nodes = {n["id"]: n for n in registry.describe()}
    assert [(nodes[i]["engine"], nodes[i]["worker"], nodes[i]["number"]) for i in ("w0", "w1", "alone")] == [
        ("eng", 0, 0), ("eng", 1, 1), ("alone", 0, 2)]


@pytest.mark.parametrize("bad", [-1, "1", True, 5000, None, 1.5])
def test_a_bad_worker_index_is_read_as_zero(clock, registry, bad) -> None:
    registry.register("w", {**info(), "engine": "eng", "worker": bad}, "127.0.0.1")
    assert registry.describe()[0]["worker"] == 0
