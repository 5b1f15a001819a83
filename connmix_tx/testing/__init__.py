"""In-memory fakes of the engine's interfaces and small test helpers, shipped with the package.

As ``twisted.internet.testing`` does for Twisted, this lets users of the engine (and its own tests,
benchmarks and conformance run) test against the engine's plain classes without sockets:

* ``FakeClientTransport``: the protocol object behind a ``ClientConnection`` (``ClientTransport``).
* ``FakeLink`` / ``FakePeers``: a mesh link to another engine and the set of links (``MeshPeers``).
* ``MemoryEndpoint`` / ``tick``: in-memory PB connections to a real server factory, on a ``Clock``.
* ``FakeSocketTransport`` / ``FakeTLS``: a transport whose kernel write queue the test controls.
* ``script_engine`` / ``ScriptEngine`` / ``Outcome``: an entry script on the real ``mix`` library,
  queues, connections and router, driven by a ``Clock`` (test Lua code without sockets).
* ``LogCapture``: what was logged through ``twisted.logger`` while a block ran.
* ``free_ports`` / ``free_port``: TCP ports of 127.0.0.1 for tests that start processes.
* ``metrics_text`` / ``sample_value``: a meter read as ``GET /metrics`` would show it.

One fake per interface: a test that needs a variant configures the fake, it does not write another.
"""

from connmix_tx.testing.clients import FakeClientTransport
from connmix_tx.testing.logs import LogCapture
from connmix_tx.testing.lua import Outcome, ScriptEngine, client_ids, script_engine
from connmix_tx.testing.mesh import FakeLink, FakePeers
from connmix_tx.testing.metrics import metrics_text, sample_value
from connmix_tx.testing.pb import CLIENT_ADDR, SERVER_ADDR, MemoryEndpoint, tick
from connmix_tx.testing.ports import free_port, free_ports
from connmix_tx.testing.sockets import FakeSocketTransport, FakeTLS

__all__ = [
    "CLIENT_ADDR",
    "SERVER_ADDR",
    "FakeClientTransport",
    "FakeLink",
    "FakePeers",
    "FakeSocketTransport",
    "FakeTLS",
    "LogCapture",
    "MemoryEndpoint",
    "Outcome",
    "ScriptEngine",
    "client_ids",
    "free_port",
    "free_ports",
    "metrics_text",
    "sample_value",
    "script_engine",
    "tick",
]
