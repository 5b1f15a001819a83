"""The service tree without sockets: its shape per role, its start and stop order, SIGHUP walking it,
the signal service and the tap's wiring (``MemoryReactorClock``: listening is only recorded)."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.application import service
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from connmix_tx.config import Config, default_config, load_config, worker_mesh_ports
from connmix_tx.errors import EXIT_CONFIG, EXIT_LISTEN, EXIT_REGISTER, FATAL_PREFIX, STARTUP_EXIT_CODES
from connmix_tx.reload import Reloader
from connmix_tx.service import ConnmixService
from connmix_tx.signals import SignalHandlers
from connmix_tx.testing import LogCapture
from connmix_tx.tree import outline, reconfigure_tree, walk
from connmix_tx.workers import WorkerRole

REPO = Path(__file__).resolve().parent.parent

CENTER = """\
  center (CenterPart)
    center.registry (Listener)
    center.apiServer (Listener)
    heartbeat (RegistryHeartbeat)"""
ENGINE = """\
  engine (EnginePart)
    engine.meshPoint (Listener)
    engine.apiServer (Listener)
    servers[0] (ProtocolServer)
    center-link (CenterLink)
    queues (QueueService)
    mesh-peers (MeshPeersService)
    lua-clients (LuaClients)"""


def loopback(config: Config) -> Config:
    """``config`` with every listener on 127.0.0.1 port 0."""

    def here(listener: Any) -> Any:
        return dataclasses.replace(listener, bind="127.0.0.1", port=0)

    return dataclasses.replace(
        config,
        center=dataclasses.replace(config.center, registry=here(config.center.registry),
                                   api_server=here(config.center.api_server)),
        engine=dataclasses.replace(config.engine, mesh_point=here(config.engine.mesh_point),
                                   api_server=here(config.engine.api_server),
                                   servers=tuple(here(s) for s in config.engine.servers)),
    )


def tree(role: str = "dev", config: Config | None = None, **kwargs: Any) -> tuple[ConnmixService, Any, list]:
    reactor, fatal = MemoryReactorClock(), []
    root = ConnmixService(config or loopback(default_config(cwd=str(REPO))), role, reactor,
                          lambda code, message: fatal.append((code, message)), **kwargs)
    return root, reactor, fatal


# Shape ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role, parts", [
    ("center", [CENTER]), ("engine", [ENGINE]), ("dev", [CENTER, ENGINE]), ("single", [CENTER, ENGINE]),
])
def test_each_role_builds_its_named_children(role: str, parts: list[str]) -> None:
    root, _, _ = tree(role)
    assert outline(root) == "\n".join(["- (ConnmixService)", *parts])


def test_a_supervisor_runs_workers_in_place_of_the_engine_and_a_worker_runs_the_engine_alone() -> None:
    supervisor, _, _ = tree("dev", processes=2)
    assert outline(supervisor) == "\n".join(["- (ConnmixService)", CENTER, "  workers (WorkerPool)"])
    assert supervisor.engine is None and supervisor.workers is not None

    config = loopback(default_config(cwd=str(REPO)))
    worker, _, _ = tree("dev", config, processes=2, worker=WorkerRole("e" * 20, 1, ("127.0.0.1", 1), None, "dev"))
    assert outline(worker) == "\n".join(["- (ConnmixService)", ENGINE, "  parent-watch (ParentWatch)"])
    assert worker.center is None and worker.engine is not None
    assert worker.engine.engine_id == "e" * 20
    assert worker.engine.mesh_listener.listener.port == worker_mesh_ports(config, "dev", 2)[-1]


def test_one_protocol_server_child_per_configured_server() -> None:
    base = loopback(default_config(cwd=str(REPO)))
    second = dataclasses.replace(base.engine.servers[0], port=0, protocol="socket",
                                 entry=str(REPO / "lua" / "entry.socket.lua"))
    config = dataclasses.replace(base, engine=dataclasses.replace(base.engine, servers=(base.engine.servers[0], second)))
    root, _, _ = tree("engine", config)
    engine = root.engine
    assert engine is not None
    names = [child.name for child in engine]
    assert names.index("servers[0]") < names.index("servers[1]") < names.index("center-link")
    assert [s.script for s in engine.servers] == engine.scripts and len(set(map(id, engine.scripts))) == 2


# Start and stop -------------------------------------------------------------------------------


def test_listeners_open_in_order_and_protocol_servers_only_once_registered() -> None:
    root, reactor, fatal = tree("dev")
    with LogCapture() as logs:
        root.privilegedStartService()
        root.startService()
    assert [line.split(" (")[0] for line in logs.lines if line.startswith("start the ")] == [
        "start the registry server", "start the center api server", "start the mesh node", "start the api server",
    ]
    assert len(reactor.tcpServers) == 4 and len(reactor.tcpClients) == 1  # the center link dials
    assert all(node.running for _, node in walk(root))
    engine = root.engine
    assert engine is not None and engine.protocol_listeners == []

    with LogCapture() as logs:
        engine.center_link.registered.callback(0)  # what a successful login fires
    assert len(reactor.tcpServers) == 5 and [s.listener.running for s in engine.servers] == [True]
    assert logs.find("start the protocol server")
    assert engine.protocol_listeners == [engine.servers[0].listener] and fatal == []


def test_a_protocol_port_that_cannot_be_bound_is_fatal_with_exit_3() -> None:
    from twisted.internet.error import CannotListenError

    root, reactor, fatal = tree("dev")
    root.privilegedStartService()
    root.startService()

    def refuse(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    reactor.listenTCP = refuse  # type: ignore[method-assign]
    assert root.engine is not None
    root.engine.center_link.registered.callback(0)
    assert fatal == [(EXIT_LISTEN, "cannot listen on 127.0.0.1:0 (engine.servers[0]): address already in use")]
    assert root.engine.protocol_listeners == []


def test_clean_stop_order_is_kept_whatever_the_order_of_the_children() -> None:
    root, _, _ = tree("dev")
    root.privilegedStartService()
    root.startService()
    engine = root.engine
    assert engine is not None
    engine.center_link.registered.callback(0)
    calls: list[str] = []

    def record(name: str, original: Any) -> Any:
        def call(*args: Any) -> Any:
            calls.append(name)
            return original(*args)
        return call

    server = engine.servers[0]
    server.stop_accepting = record("stop accepting", server.stop_accepting)  # type: ignore[method-assign]
    server.close_clients = record("close clients", server.close_clients)  # type: ignore[method-assign]
    engine.api_factory.shutdown = record("close api sockets", engine.api_factory.shutdown)
    for child in (engine.queue_service, engine.mesh_peers, engine.lua_clients, engine.center_link,
                  engine.api_listener, engine.mesh_listener):
        child.stopService = record(child.name, child.stopService)  # type: ignore[method-assign]

    done: list[Any] = []
    root.stopService().addBoth(done.append)
    assert len(done) == 1 and not isinstance(done[0], Failure)
    assert calls == ["stop accepting", "close clients", "close api sockets", "queues", "mesh-peers",
                     "lua-clients", "center-link", "engine.apiServer", "engine.meshPoint"]
    assert not [node.name for _, node in walk(root) if node.running]


# SIGHUP ---------------------------------------------------------------------------------------


class Recorder(service.Service):
    """A reconfigurable child: what the walk hands it."""

    def __init__(self, name: str, seen: list) -> None:
        self.setName(name)
        self.seen = seen

    def reconfigure(self, old: Config, new: Config) -> None:
        self.seen.append((self.name, old, new))


def test_the_walk_visits_parents_before_children_in_order() -> None:
    seen: list = []
    root = service.MultiService()
    first = service.MultiService()
    first.setName("first")
    first.setServiceParent(root)
    Recorder("a", seen).setServiceParent(first)
    service.Service().setServiceParent(root)  # not reconfigurable: skipped
    Recorder("b", seen).setServiceParent(root)
    old, new = default_config(), default_config()
    reconfigure_tree(root, old, new)
    assert [(name, o is old, n is new) for name, o, n in seen] == [("a", True, True), ("b", True, True)]


def write(path: Path, mesh_timeout: int = 5, **engine: Any) -> Path:
    """A dev configuration file; the ports are never bound (``MemoryReactorClock``)."""
    data = {
        "center": {"registry": {"bind": "127.0.0.1", "port": 7101},
                   "apiServer": {"bind": "127.0.0.1", "port": 7102}},
        "engine": {"meshPoint": {"bind": "127.0.0.1", "port": 7103},
                   "apiServer": {"bind": "127.0.0.1", "port": 7104},
                   "servers": [{"bind": "127.0.0.1", "port": 7105}], **engine},
        "cluster": {"meshTimeout": mesh_timeout},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_reload_walks_the_tree_hot_keys_reach_their_child_and_cold_keys_do_not(tmp_path: Path) -> None:
    path = write(tmp_path / "connmix.yaml")
    root, _, _ = tree("dev", load_config(str(path)))
    engine = root.engine
    assert engine is not None
    server = engine.servers[0]
    limits: list[int] = []
    server.script.set_instruction_limit = limits.append  # type: ignore[method-assign]
    seen: list = []
    Recorder("probe", seen).setServiceParent(engine)
    old_config = root.config

    write(path, mesh_timeout=9, luavm={"maxInstructions": 777, "queue": {"topicSize": 3, "maxTopics": 4}},
          apiServer={"bind": "127.0.0.1", "port": 7104, "maxMessageSize": 2048},
          servers=[{"bind": "127.0.0.1", "port": 7777, "byteCodeExpires": 2,
                    "options": [{"name": "path", "value": "/x"}]}])
    with LogCapture() as logs:
        Reloader(root).reload()

    assert logs.find("config reloaded") and not logs.find("config reload failed")
    assert sorted(line for line in logs.lines if "restart required" in line) == [
        "config reload: cluster.meshTimeout changed, restart required",
        "config reload: engine.servers[0].port changed, restart required",
    ]
    # Hot keys reached their child.
    assert limits == [777]
    assert server.hot_reloader.interval == 2
    assert server.library.options == {"path": "/x"}
    assert (engine.queues.topic_size, engine.queues.max_topics) == (3, 4)
    assert engine.api_factory.config.max_message_size == 2048
    # Cold keys did not: every child saw the running values.
    [(_, old, new)] = seen
    assert old is old_config and root.config is new
    assert new.cluster.mesh_timeout == 5 and new.engine.servers[0].port == 7105
    assert server.config.port == 7105 and new.engine.luavm.max_instructions == 777

    # A file that does not validate reaches nobody.
    path.write_text("engine: [not, a, mapping]\n")
    with LogCapture() as logs:
        Reloader(root).reload()
    assert logs.find("config reload failed: config engine: expected mapping") and len(seen) == 1


def test_the_root_replaces_the_access_control_before_the_engine_closes_removed_users() -> None:
    from connmix_tx.config import AccessConfig, UserConfig

    root, _, _ = tree("dev")
    assert root.engine is not None
    calls: list[str] = []
    replace = root.access.replace

    def replaced(access: AccessConfig) -> None:
        calls.append("access replaced")
        replace(access)

    root.access.replace = replaced  # type: ignore[method-assign]
    root.engine.api_factory.users_replaced = lambda: calls.append("removed users closed")
    old = root.config
    new = dataclasses.replace(old, access=AccessConfig(users=(UserConfig("bob", "pw", ("read",), "*"),),
                                                       protected=True))
    reconfigure_tree(root, old, new)
    assert calls == ["access replaced", "removed users closed"]
    reconfigure_tree(root, new, new)  # nothing changed: nothing closed
    assert calls == ["access replaced", "removed users closed"]


def test_a_supervisor_forwards_a_valid_reload_to_its_workers() -> None:
    root, _, _ = tree("dev", processes=2)
    assert root.workers is not None
    sent: list[str] = []
    root.workers.supervisor.signal_all = sent.append  # type: ignore[method-assign]
    reconfigure_tree(root, root.config, root.config)
    assert sent == ["HUP"]


# Signals --------------------------------------------------------------------------------------


class Running:
    """Just enough reactor: runs ``callWhenRunning`` / ``callFromThread`` calls when told."""

    def __init__(self) -> None:
        self.when_running: list = []
        self.from_thread: list = []
        self.stopped = 0

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.when_running.append((f, args))

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_thread.append((f, args))

    def stop(self) -> None:
        self.stopped += 1


@pytest.mark.parametrize("worker", [False, True])
def test_signal_handlers_are_installed_when_the_reactor_runs(worker: bool) -> None:
    reactor, installed, reloads = Running(), {}, []
    handlers = SignalHandlers(reactor, lambda: reloads.append(1), ignore_interrupt=worker,
                              install=lambda signum, handler: installed.__setitem__(signum, handler))
    handlers.startService()
    assert installed == {}  # the reactor would replace them at start
    for f, args in reactor.when_running:
        f(*args)
    assert set(installed) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    assert (installed[signal.SIGINT] is signal.SIG_IGN) is worker

    installed[signal.SIGHUP](signal.SIGHUP, None)
    assert reloads == []  # not inside the signal handler: on the reactor thread
    installed[signal.SIGTERM](signal.SIGTERM, None)
    for f, args in reactor.from_thread:
        f(*args)
    assert reloads == [1] and reactor.stopped == 1


# Exit codes -----------------------------------------------------------------------------------


def test_exit_codes_have_one_home() -> None:
    from connmix_tx import supervisor, workers
    from connmix_tx.engine import center_link

    assert (EXIT_CONFIG, EXIT_LISTEN, EXIT_REGISTER) == (2, 3, 4)
    assert supervisor.STARTUP_EXIT_CODES is STARTUP_EXIT_CODES
    assert workers.FATAL_PREFIX is FATAL_PREFIX and center_link.EXIT_REGISTER == 4


# The tap --------------------------------------------------------------------------------------


def test_options_validate_and_print_nothing_files_open_when_twistd_asks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from connmix_tx.tap import Options

    config = write(tmp_path / "connmix.yaml")
    logfile = tmp_path / "twistd.log"
    options = Options()
    parent: dict[str, Any] = {"logfile": str(logfile)}
    options.parent = parent  # type: ignore[attr-defined]
    options.parseOptions(["--dev", "-f", str(config)])
    assert capsys.readouterr() == ("", "")
    assert not logfile.exists()  # nothing opened yet
    observer = parent["logger"]()  # what twistd does when it starts logging
    assert logfile.exists() and callable(observer)


def test_a_log_file_that_cannot_be_opened_ends_the_process_with_one_line_when_twistd_asks(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from connmix_tx.tap import Options

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "connmix.yaml"
    write(config)
    config.write_text(config.read_text() + f"logging:\n  filename: {blocker / 'connmix.log'}\n")
    options = Options()
    parent: dict[str, Any] = {}
    options.parent = parent  # type: ignore[attr-defined]
    options.parseOptions(["--dev", "-f", str(config)])  # valid: the file is not opened here
    with pytest.raises(SystemExit) as exit_:
        parent["logger"]()
    assert exit_.value.code == EXIT_CONFIG
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"connmix: config logging.filename: cannot open {blocker}")


def test_options_refuse_a_bad_file_with_one_line_and_exit_2(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from connmix_tx.tap import Options

    bad = tmp_path / "bad.yaml"
    bad.write_text("logging:\n  level: verbose\n")
    with pytest.raises(SystemExit) as exit_:
        Options().parseOptions(["--dev", "-f", str(bad)])
    assert exit_.value.code == EXIT_CONFIG
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("connmix: config logging.level: ")


def test_make_service_prints_the_banner_and_adds_logging_and_signals(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from connmix_tx.tap import Options, makeService

    options = Options()
    options.parent = {}  # type: ignore[attr-defined]
    options.parseOptions(["--dev", "-f", str(write(tmp_path / "connmix.yaml"))])
    root = makeService(options)
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("connmix-tx ")
    assert [child.name for child in root] == ["center", "engine", "logging", "signals"]
