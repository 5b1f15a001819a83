"""Tests for connmix_tx.engine.mesh_link.MeshPeers and the Router over it (docs/operations.md,
"The mesh" and "Routing").

``MeshPeers`` turns node lists into ``MeshLink``s to real ``mesh_factory`` mesh points joined in
memory (``connmix_tx.testing.MemoryEndpoint``, ``meshpeer``); the ``Router`` then sends, calls and publishes through them.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from connmix_tx.engine.connections import SLOW_CONSUMER, ConnectionRegistry
from connmix_tx.engine.mesh_link import MeshLink, MeshPeers
from connmix_tx.engine.router import NODE_UNAVAILABLE, LocalOps, Router

from connmix_tx.testing import tick
from meshpeer import MESH_TIMEOUT, OWN_ID, WAITING, Batches, Peer, add_client, client_id, results


@pytest.fixture
def batches(monkeypatch) -> Batches:
    return Batches(monkeypatch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


# MeshPeers ---------------------------------------------------------------------------------------


class Cluster:
    """MeshPeers over peers 1..n, each reached through its own in-memory endpoint."""

    def __init__(self, clock: Clock, n: int) -> None:
        self.clock = clock
        self.peers = {number: Peer(clock, number) for number in range(1, n + 1)}
        self.made: list[str] = []
        self.mesh = MeshPeers(self.make_link, OWN_ID)

    def make_link(self, node: dict) -> MeshLink:
        self.made.append(node["id"])
        return self.peers[node["number"]].link(node)

    def nodes(self, *numbers: int) -> list[dict]:
        own = {"id": OWN_ID, "number": 0, "mesh_point": "10.0.0.100:6788"}
        return [own] + [self.peers[n].node for n in numbers]

    def tick(self, seconds: float, *numbers: int) -> None:
        tick(self.clock, seconds, [self.peers[n].endpoint for n in numbers])


def test_peers_dial_new_nodes_but_not_their_own(clock, batches) -> None:
    cluster = Cluster(clock, 2)
    cluster.mesh.update(cluster.nodes(1, 2))
    assert cluster.made == ["peer1", "peer2"]
    cluster.tick(0.25, 1, 2)
    assert cluster.mesh.up == 2
    assert cluster.mesh.link_for(0) is None
    assert [cluster.mesh.link_for(n).node_id for n in (1, 2)] == ["peer1", "peer2"]
    assert {link.node_id for link in cluster.mesh.links()} == {"peer1", "peer2"}
    cluster.mesh.update(cluster.nodes(1, 2))
    assert cluster.made == ["peer1", "peer2"]  # no second link


def test_node_leaving_stops_its_link_and_fails_its_ops(clock, batches) -> None:
    cluster = Cluster(clock, 2)
    cluster.mesh.update(cluster.nodes(1, 2))
    cluster.tick(0.25, 1, 2)
    leaving = cluster.mesh.link_for(1)
    conn = cluster.peers[1].client()
    batches.holding = True
    pending = leaving.send(conn.client_id, b"x", False)
    cluster.tick(0.25, 1, 2)
    cluster.mesh.update(cluster.nodes(2))
    assert results(pending) == [NODE_UNAVAILABLE] and leaving.state == "down"
    assert cluster.mesh.link_for(1) is None
    assert [link.node_id for link in cluster.mesh.links()] == ["peer2"]
    cluster.tick(5, 1, 2)
    assert len(cluster.peers[1].endpoint.pumps) == 1  # not redialled


def test_changed_mesh_point_replaces_the_link(clock, batches) -> None:
    cluster = Cluster(clock, 1)
    cluster.mesh.update(cluster.nodes(1))
    cluster.tick(0.25, 1)
    old = cluster.mesh.link_for(1)
    cluster.peers[1].node = {**cluster.peers[1].node, "mesh_point": "10.0.0.51:6788"}
    cluster.mesh.update(cluster.nodes(1))
    assert old.state == "down" and cluster.made == ["peer1", "peer1"]
    cluster.tick(0.25, 1)
    new = cluster.mesh.link_for(1)
    assert new is not old and new.mesh_point == "10.0.0.51:6788" and new.state == "up"
    assert cluster.peers[1].endpoint.pumps[0].clientIO.disconnected  # the old connection closed


def test_node_leaving_while_its_link_logs_in(clock, batches) -> None:
    cluster = Cluster(clock, 2)
    cluster.mesh.update(cluster.nodes(1))  # connected, login not answered yet
    cluster.mesh.update(cluster.nodes(2))
    assert cluster.made == ["peer1", "peer2"]
    cluster.tick(0.25, 1, 2)
    assert [link.node_id for link in cluster.mesh.links()] == ["peer2"] and cluster.mesh.up == 1


def test_down_links_are_not_offered(clock, batches) -> None:
    cluster = Cluster(clock, 2)
    cluster.mesh.update(cluster.nodes(1, 2))
    cluster.tick(0.25, 1, 2)
    cluster.tick(15, 2)  # peer 1 stays silent: dropped
    assert cluster.mesh.link_for(1) is None and cluster.mesh.link_for(2) is not None
    assert [link.node_id for link in cluster.mesh.links()] == ["peer2"]
    cluster.mesh.stop()
    assert cluster.mesh.links() == [] and cluster.mesh.by_id == {}


# Router over the mesh ----------------------------------------------------------------------------


def test_router_sends_calls_and_publishes_over_the_mesh(clock, batches) -> None:
    cluster = Cluster(clock, 1)
    cluster.mesh.update(cluster.nodes(1))
    cluster.tick(0.25, 1)
    here = ConnectionRegistry()
    router = Router(0, LocalOps(here), cluster.mesh)
    local = add_client(here, client_id(0), channels=("news",))
    remote = cluster.peers[1].client(channels=("news",))
    cluster.peers[1].client(2, channels=("news",))
    cluster.peers[1].client(3, error=SLOW_CONSUMER, channels=("news",))

    sent = router.send(remote.client_id, b"via mesh", False)
    called = router.call(remote.client_id, "set_context_value", ["k", "v"])
    published = router.publish("news", b"all", False)
    assert isinstance(sent, Deferred)
    cluster.tick(0.25, 1)
    assert results(sent, called, published) == [None, None, (3, 1)]
    assert remote.transport.payloads == [b"via mesh", b"all"] and remote.context == {"k": "v"}
    assert local.transport.payloads == [b"all"]
    assert router.send(client_id(2), b"x", False) == NODE_UNAVAILABLE  # no such peer


def test_router_publish_counts_a_silent_peer_as_zero(clock, batches) -> None:
    cluster = Cluster(clock, 1)
    cluster.mesh.update(cluster.nodes(1))
    cluster.tick(0.25, 1)
    cluster.peers[1].client(channels=("news",))
    here = ConnectionRegistry()
    add_client(here, client_id(0), channels=("news",))
    router = Router(0, LocalOps(here), cluster.mesh)
    batches.holding = True
    d = router.publish("news", b"x", False)
    cluster.tick(MESH_TIMEOUT - 0.25, 1)
    assert results(d) == [WAITING]
    cluster.tick(0.25, 1)
    assert results(d) == [(1, 0)]  # local 1/0 + the silent peer as 0/0
