"""Tests for connmix_tx.engine.center_link: an engine registering at the center (docs/operations.md,
"The cluster").

``CenterLink`` talks to a real ``registry_factory(Registry(clock), secret)`` joined in memory by
``connmix_tx.testing.MemoryEndpoint``; a ``Clock`` drives its ClientService, heartbeats and deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.task import Clock

from connmix_tx.center.pb import registry_factory
from connmix_tx.center.registry import Registry
from connmix_tx.engine.center_link import CenterLink
from connmix_tx.testing import LogCapture, MemoryEndpoint, tick

SECRET = "s3cret"
NODE_ID = "c8u7jfbin5659oh0b13g"
OTHER_ID = "c8u7jfbin5659oh0b14g"
ADDRESS = "127.0.0.1:6786"
INTERVAL = 5.0
INFO = {"api_server_port": 6789, "mesh_point_port": 6788, "advertise_host": "10.0.0.1", "version": "0.1.0"}


@dataclass
class Engine:
    """One CenterLink, the registry it talks to, and what it reported."""

    clock: Clock
    registry: Registry
    endpoint: MemoryEndpoint
    link: CenterLink
    fatal: list[tuple[int, str]] = field(default_factory=list)
    node_lists: list[list] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)

    def start(self) -> None:
        self.link.registered.addCallback(self.registered.append)
        self.link.startService()
        self.endpoint.flush()

    def tick(self, seconds: float) -> None:
        tick(self.clock, seconds, [self.endpoint])

    def restart_center(self) -> Registry:
        """The center comes back with empty state: new connections reach a new registry."""
        self.registry = self.watch(Registry(self.clock))
        self.endpoint.server_factory = registry_factory(self.registry, SECRET)
        return self.registry

    def watch(self, registry: Registry) -> Registry:
        """Record the ``info`` of every registration reaching ``registry``."""
        register = registry.register

        def recording(node_id: str, info: dict, *args: Any, **kwargs: Any) -> Any:
            if node_id == NODE_ID:
                self.claims.append(dict(info))
            return register(node_id, info, *args, **kwargs)

        registry.register = recording  # type: ignore[method-assign]
        return registry


def make_engine(secret: str = SECRET, register_timeout: float | None = None) -> Engine:
    clock = Clock()
    registry = Registry(clock, heartbeat_timeout=15, number_reserve=60)
    endpoint = MemoryEndpoint(registry_factory(registry, SECRET), clock)
    engine: Engine

    def fatal(code: int, message: str) -> None:
        engine.fatal.append((code, message))

    link = CenterLink(
        lambda: (endpoint, ADDRESS), NODE_ID, INFO, secret, clock, INTERVAL,
        stats=lambda: {"clients": 3, "channels": 2},
        on_nodes=lambda nodes: engine.node_lists.append(nodes),
        fatal=fatal,
        register_timeout=register_timeout,
    )
    engine = Engine(clock, registry, endpoint, link)
    engine.watch(registry)
    return engine


@pytest.fixture
def engine() -> Engine:
    """An engine registered at the center (number 0)."""
    engine = make_engine(register_timeout=10)
    engine.start()
    assert engine.registered == [0]
    return engine


def node_ids(nodes: list[dict]) -> list[str]:
    return [n["id"] for n in nodes]


# Registration --------------------------------------------------------------------------------


def test_registration_gets_number_0_nodes_and_a_log_line() -> None:
    engine = make_engine(register_timeout=10)
    with LogCapture() as logs:
        engine.start()
    assert engine.registered == [0] and engine.link.number == 0
    assert engine.claims == [INFO]  # the first registration claims no number
    assert engine.node_lists and all(node_ids(nodes) == [NODE_ID] for nodes in engine.node_lists)
    assert engine.node_lists[0][0]["mesh_point"] == "10.0.0.1:6788"
    assert f"register engine node_id {NODE_ID} number 0" in logs.texts("connmix.engine")
    assert engine.fatal == []


def test_second_engine_gets_the_next_number_and_the_first_learns_of_it(engine) -> None:
    other = make_engine()
    other.registry = engine.registry
    other.endpoint.server_factory = engine.endpoint.server_factory  # the same center
    other.link.node_id = OTHER_ID
    other.start()
    engine.endpoint.flush()
    assert other.registered == [1]
    assert node_ids(engine.node_lists[-1]) == [NODE_ID, OTHER_ID]  # pushed to the first one


def test_heartbeats_every_interval_reach_the_registry(engine) -> None:
    record = engine.registry.engines[NODE_ID]
    assert record.last_seen == 0
    engine.tick(INTERVAL - 1)
    assert record.last_seen == 0
    engine.tick(1)
    assert record.last_seen == INTERVAL
    assert (record.clients, record.channels) == (3, 2)
    engine.tick(3 * INTERVAL)
    assert record.last_seen == 4 * INTERVAL
    engine.registry.sweep()
    assert NODE_ID in engine.registry.engines  # never timed out


def test_register_timeout_is_cancelled_once_registered(engine) -> None:
    engine.tick(60)
    assert engine.fatal == []


# Refusal and unreachable center ---------------------------------------------------------------


def test_wrong_secret_never_registers_and_ends_in_exit_4() -> None:
    engine = make_engine(secret="not the secret", register_timeout=10)
    engine.start()
    engine.tick(10)
    assert engine.registered == [] and engine.claims == []
    assert engine.fatal and {code for code, _ in engine.fatal} == {4}


def test_wrong_secret_is_fatal_at_once_as_a_refusal() -> None:
    engine = make_engine(secret="not the secret", register_timeout=10)
    engine.start()
    assert engine.fatal == [
        (4, f"center registry {ADDRESS} refused registration: login refused (cluster.secret)")
    ]


def test_center_that_never_answers_is_fatal_after_register_timeout() -> None:
    engine = make_engine(register_timeout=10)
    engine.endpoint.hang = True
    engine.start()
    engine.tick(9.75)
    assert engine.fatal == []
    engine.tick(0.25)
    assert engine.fatal == [(4, f"cannot reach center registry {ADDRESS}: no answer")]
    assert engine.registered == []


def test_refused_connections_are_retried_then_fatal_after_register_timeout() -> None:
    engine = make_engine(register_timeout=10)
    engine.endpoint.refuse = True
    engine.start()
    engine.tick(10)
    assert engine.endpoint.attempts == 4  # at 0, 1, 3 and 7 s: back-off 1 s -> 30 s
    assert engine.fatal == [(4, f"cannot reach center registry {ADDRESS}: connection refused")]


def test_center_found_late_within_register_timeout_is_fine() -> None:
    engine = make_engine(register_timeout=10)
    engine.endpoint.refuse = True
    engine.start()
    engine.tick(2)
    engine.endpoint.refuse = False
    engine.tick(2)  # retry at 3 s succeeds
    assert engine.registered == [0]
    engine.tick(20)
    assert engine.fatal == []


# Reconnection and re-registration -------------------------------------------------------------


def test_connection_lost_then_regained_reclaims_the_same_number(engine) -> None:
    engine.endpoint.lose()
    assert NODE_ID not in engine.registry.engines  # the center marked it down
    engine.registry.register(OTHER_ID, dict(INFO), "10.0.0.2")  # 0 is reserved: gets 1
    engine.tick(1)
    assert len(engine.endpoint.pumps) == 2
    assert engine.claims == [INFO, {**INFO, "number": 0}]
    assert engine.registry.engines[NODE_ID].number == 0
    assert engine.registered == [0] and engine.fatal == []
    assert node_ids(engine.node_lists[-1]) == [NODE_ID, OTHER_ID]
    engine.tick(INTERVAL)
    assert engine.registry.engines[NODE_ID].last_seen == engine.clock.seconds()  # heartbeats resumed


def test_unreachable_center_warns_at_most_every_30_seconds(engine) -> None:
    engine.endpoint.refuse = True
    with LogCapture() as logs:
        engine.endpoint.lose()
        engine.tick(100)  # attempts at 1, 3, 7, 15, 31, 61, 91 s
    assert engine.endpoint.attempts == 1 + 7
    warnings = [t for t in logs.texts("connmix.engine") if "unreachable" in t]
    assert warnings == [f"center registry {ADDRESS} unreachable: connection refused; retrying"] * 4  # 1, 31, 61, 91 s


def test_connection_closed_before_pb_negotiation_is_redialled() -> None:
    engine = make_engine(register_timeout=10)
    engine.link.registered.addCallback(engine.registered.append)
    engine.link.startService()
    engine.endpoint.pump.serverIO.getOutBuffer()  # the center's greeting never arrives
    engine.endpoint.lose()
    engine.tick(2)
    assert engine.registered == [0] and engine.fatal == []


def test_stopping_while_registering_is_clean() -> None:
    engine = make_engine(register_timeout=10)
    engine.link.startService()
    for _ in range(3):  # PB negotiated, login under way
        engine.endpoint.pump.pump()
    engine.link.stopService()
    engine.endpoint.flush()
    assert engine.registered == [] and engine.fatal == []


def test_registry_forgetting_the_engine_makes_it_register_again(engine) -> None:
    engine.registry.drop(NODE_ID, "heartbeat timeout")
    engine.tick(INTERVAL)  # the heartbeat answers False: reconnect
    engine.tick(1)
    assert len(engine.endpoint.pumps) == 2
    assert engine.claims[-1] == {**INFO, "number": 0}
    assert engine.registry.engines[NODE_ID].number == 0
    assert engine.fatal == []


def test_center_restart_with_empty_state_accepts_the_claimed_number(engine) -> None:
    engine.endpoint.lose()
    registry = engine.restart_center()
    engine.tick(1)
    assert engine.claims[-1] == {**INFO, "number": 0}
    assert registry.engines[NODE_ID].number == 0
    assert registry.register(OTHER_ID, dict(INFO), "10.0.0.2").number == 1
    assert engine.fatal == []


def test_number_taken_meanwhile_is_fatal(engine) -> None:
    engine.endpoint.lose()
    registry = engine.restart_center()
    registry.register(OTHER_ID, dict(INFO), "10.0.0.2")  # the new center gives OTHER number 0
    engine.tick(1)
    assert engine.claims[-1] == {**INFO, "number": 0}
    assert len(engine.fatal) == 1
    code, message = engine.fatal[0]
    assert code == 4 and message.startswith("node number 0 lost; exiting")


def test_number_taken_meanwhile_is_never_registered_twice(engine) -> None:
    engine.endpoint.lose()
    registry = engine.restart_center()
    registry.register(OTHER_ID, dict(INFO), "10.0.0.2")
    engine.tick(30)
    assert NODE_ID not in registry.engines  # the claim is refused every time
    assert registry.engines[OTHER_ID].number == 0
    assert engine.link.number == 0
