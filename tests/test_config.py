"""Tests for connmix_tx.config: the configuration file as a user writes it
(docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from connmix_tx import home
from connmix_tx.config import (
    ROLES,
    ApiServerConfig,
    Config,
    ConfigError,
    HostPort,
    ListenerConfig,
    ServerConfig,
    TLSConfig,
    default_config,
    listeners,
    load_config,
    parse_config,
    reload_diff,
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory holding the default entry script, so every role can start."""
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "entry.websocket.lua").write_text("-- entry\n")
    return tmp_path


def load(workdir: Path, text: str, role: str = "dev") -> Config:
    """Write ``text`` as connmix.yaml in ``workdir`` and load it from there."""
    path = workdir / "connmix.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), role=role, cwd=str(workdir))


def error_of(workdir: Path, text: str, role: str = "dev") -> str:
    with pytest.raises(ConfigError) as info:
        load(workdir, text, role)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_packaged_file_equals_builtin_defaults(workdir: Path) -> None:
    loaded = load_config(role="dev", cwd=str(workdir))
    assert loaded.source == os.path.abspath(home.default_config_path())
    builtin = default_config(cwd=str(workdir))
    assert builtin.source is None
    for field in dataclasses.fields(Config):
        if field.name != "source":
            assert getattr(loaded, field.name) == getattr(builtin, field.name), field.name


def test_defaults_match_spec(workdir: Path) -> None:
    config = default_config(cwd=str(workdir))
    assert config.logging.filename == "" and config.logging.level == "info"
    assert config.access.users == () and config.access.protected is True
    assert config.cluster.heartbeat_interval == 5.0 and config.cluster.heartbeat_timeout == 15.0
    assert config.engine.center_registry == HostPort("127.0.0.1", 6786)
    assert [redis.name for redis in config.engine.luavm.redis] == ["default"]
    assert str(config.engine.luavm.redis[0].addr) == "127.0.0.1:6379"
    (server,) = config.engine.servers
    assert server.protocol == "websocket"
    assert server.entry == str(workdir / "lua" / "entry.websocket.lua")
    assert server.options == (("path", "/"),) and server.option("path") == "/"
    assert server.option("origins") is None
    assert config.unused_keys == ()
    assert [(path, item.address) for path, item in listeners(config, "dev")] == [
        ("center.registry", "0.0.0.0:6786"),
        ("center.apiServer", "0.0.0.0:6787"),
        ("engine.meshPoint", "0.0.0.0:6788"),
        ("engine.apiServer", "0.0.0.0:6789"),
        ("engine.servers[0]", "0.0.0.0:6790"),
    ]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "~\n"])
def test_empty_file_means_all_defaults(workdir: Path, text: str) -> None:
    config = load(workdir, text)
    assert dataclasses.replace(config, source=None) == default_config(cwd=str(workdir))


def test_null_section_means_defaults(workdir: Path) -> None:
    config = load(workdir, "logging:\nengine:\n  apiServer:\n")
    assert config.logging == default_config(cwd=str(workdir)).logging
    assert config.engine.api_server.port == 6789


def test_config_objects_are_frozen(workdir: Path) -> None:
    config = default_config(cwd=str(workdir))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.logging.level = "debug"  # type: ignore[misc]


# --------------------------------------------------------------------------- values


def test_partial_server_entries_take_defaults(workdir: Path) -> None:
    (workdir / "lua" / "entry.socket.lua").write_text("-- socket\n")
    config = load(workdir, """
        engine:
          servers:
            - port: 7000
            - protocol: socket
              port: 7001
              entry: lua/entry.socket.lua
              options:
                - {name: retries, value: 1}
                - {name: debug, value: true}
                - {name: ratio, value: 1.5}
              compression: true
    """)
    first, second = config.engine.servers
    assert (first.protocol, first.port, first.options) == ("websocket", 7000, (("path", "/"),))
    assert first.entry == str(workdir / "lua" / "entry.websocket.lua")
    assert first.read_timeout == 60 and first.write_timeout == 10 and first.tls is None
    assert second.protocol == "socket" and second.compression is True
    assert second.options == (("retries", "1"), ("debug", "true"), ("ratio", "1.5"))
    assert second.option("retries") == "1" and second.option("path") is None


def test_redis_list_replaces_default(workdir: Path) -> None:
    config = load(workdir, """
        engine:
          luavm:
            redis:
              - name: cache
                addr: "[::1]:6380"
              - name: store
                db: 3
    """)
    cache, store = config.engine.luavm.redis
    assert cache.name == "cache" and cache.addr == HostPort("::1", 6380) and cache.pool_size == 20
    assert store.addr == HostPort("127.0.0.1", 6379) and store.db == 3


def test_users_roles_normalised(workdir: Path) -> None:
    config = load(workdir, """
        access:
          users:
            - {username: backend, password: secret, roles: [write], host: 127.0.0.1}
            - {username: console, password: other}
    """)
    backend, console = config.access.users
    assert backend.roles == ("read", "write") and backend.host == "127.0.0.1"
    assert console.roles == ("read",) and console.host == "*"


def test_floats_accept_integers(workdir: Path) -> None:
    text = "cluster: {heartbeatInterval: 1, heartbeatTimeout: 2.5, numberReserve: 0}"
    config = load(workdir, text)
    assert config.cluster.heartbeat_interval == 1.0
    assert isinstance(config.cluster.heartbeat_interval, float)
    assert config.cluster.heartbeat_timeout == 2.5 and config.cluster.number_reserve == 0.0


def test_unused_compatibility_keys_are_reported(workdir: Path) -> None:
    config = load(workdir, """
        licenses:
          activationCode: abc
          server: 1
        prometheus:
          summary: {maxAge: 10s, ageBuckets: 5, bufCap: ~}
        engine:
          apiServer: {readBufferSize: 1024}
          servers:
            - writeBufferSize: 4096
    """)
    assert config.unused_keys == (
        "licenses.activationCode",
        "licenses.server",
        "prometheus.summary.maxAge",
        "prometheus.summary.ageBuckets",
        "prometheus.summary.bufCap",
        "engine.apiServer.readBufferSize",
        "engine.servers[0].writeBufferSize",
    )


def test_host_port_parsing() -> None:
    assert HostPort.parse("10.0.0.5:6786") == HostPort("10.0.0.5", 6786)
    assert str(HostPort.parse("[::1]:6786")) == "[::1]:6786"
    assert str(HostPort("center.local", 6786)) == "center.local:6786"
    for bad in ("foo", ":6786", "host:", "host:0", "host:65536", "::1:6786", "[::1]6786", "h:p"):
        with pytest.raises(ValueError):
            HostPort.parse(bad)


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_cwd_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_home = tmp_path / "home"
    cwd = tmp_path / "work"
    for base in (fake_home, cwd):
        (base / "lua").mkdir(parents=True)
        (base / "lua" / "both.lua").write_text("")
    (fake_home / "lua" / "home_only.lua").write_text("")
    monkeypatch.setattr(home, "home_dir", lambda: str(fake_home))
    config = load(cwd, """
        logging: {filename: logs/connmix.log}
        engine:
          servers:
            - {port: 7000, entry: lua/both.lua}
            - {port: 7001, entry: lua/home_only.lua}
    """)
    assert config.logging.filename == str(cwd / "logs" / "connmix.log")
    assert [server.entry for server in config.engine.servers] == [
        str(cwd / "lua" / "both.lua"),
        str(fake_home / "lua" / "home_only.lua"),
    ]


def test_missing_entry_names_resolved_path(workdir: Path) -> None:
    text = "engine: {servers: [{entry: lua/missing.lua}]}"
    expected = f"config engine.servers[0].entry: file not found: {workdir / 'lua' / 'missing.lua'}"
    assert error_of(workdir, text, "engine") == expected
    assert error_of(workdir, text, "single") == expected


def test_center_does_not_need_entry_scripts(tmp_path: Path) -> None:
    config = load(tmp_path, "engine: {servers: [{entry: lua/missing.lua}]}", role="center")
    assert config.engine.servers[0].entry == str(tmp_path / "lua" / "missing.lua")


def test_entry_must_be_a_file(workdir: Path) -> None:
    assert error_of(workdir, "engine: {servers: [{entry: lua}]}") == (
        f"config engine.servers[0].entry: not a regular file: {workdir / 'lua'}"
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine: {apiServer: {maxMessgeSize: 1}}",
         "config engine.apiServer.maxMessgeSize: unknown key"),
        ("loging: {}", "config loging: unknown key"),
        ("1: x", "config 1: unknown key"),
        ("licenses: {key: x}", "config licenses.key: unknown key"),
        ("engine: {servers: [{port: '6790'}]}",
         "config engine.servers[0].port: expected integer, got string"),
        ("engine: {servers: [{port: true}]}",
         "config engine.servers[0].port: expected integer, got boolean"),
        ("engine: {servers: [{port: 1.5}]}",
         "config engine.servers[0].port: expected integer, got number"),
        ("engine: {servers: [{port: ~}]}",
         "config engine.servers[0].port: expected integer, got null"),
        ("engine: {servers: [{port: [1]}]}",
         "config engine.servers[0].port: expected integer, got list"),
        ("center: {registry: {port: {a: 1}}}",
         "config center.registry.port: expected integer, got mapping"),
        ("cluster: {meshTimeout: yes}", "config cluster.meshTimeout: expected number, got boolean"),
        ("cluster: {secret: 123}", "config cluster.secret: expected string, got integer"),
        ("access: {protected: 'no'}", "config access.protected: expected boolean, got string"),
        ("engine: {servers: {port: 1}}", "config engine.servers: expected list, got mapping"),
        ("engine: [1, 2]", "config engine: expected mapping, got list"),
        ("- 1\n- 2", "config: expected mapping, got list"),
        ("just text", "config: expected mapping, got string"),
        ("engine: {apiServer: {port: 70000}}",
         "config engine.apiServer.port: expected integer 1-65535, got 70000"),
        ("center: {registry: {port: 0}}",
         "config center.registry.port: expected integer 1-65535, got 0"),
        ("engine: {apiServer: {maxMessageSize: 10}}",
         "config engine.apiServer.maxMessageSize: expected integer >= 1024, got 10"),
        ("logging: {maxFiles: 0}", "config logging.maxFiles: expected integer >= 1, got 0"),
        ("cluster: {meshTimeout: 0}", "config cluster.meshTimeout: expected number > 0, got 0"),
        ("cluster: {numberReserve: -1.5}",
         "config cluster.numberReserve: expected number >= 0, got -1.5"),
        ("logging: {level: verbose}",
         "config logging.level: expected one of debug, info, warn, error, got 'verbose'"),
        ("logging: {format: xml}", "config logging.format: expected one of text, json, got 'xml'"),
        ("engine: {servers: [{protocol: http}]}",
         "config engine.servers[0].protocol: expected one of websocket, socket, got 'http'"),
        ("access: {users: [{username: a, password: b, roles: [read, admin]}]}",
         "config access.users[0].roles[1]: expected one of read, write, got 'admin'"),
        ("access: {users: [{username: a}]}",
         "config access.users[0].password: missing required key"),
        ("access: {users: [{password: a}]}",
         "config access.users[0].username: missing required key"),
        ("access: {users: [{username: '', password: a}]}",
         "config access.users[0].username: expected non-empty string, got ''"),
        ("engine: {servers: [{}, {port: 7000, options: [{name: a, value: [1]}]}]}",
         "config engine.servers[1].options[0].value: expected string, got list"),
        ("engine: {servers: [{options: [{value: x}]}]}",
         "config engine.servers[0].options[0].name: missing required key"),
        ("engine: {luavm: {redis: [{}, {name: default, db: 1}]}}",
         "config engine.luavm.redis[1].name: duplicate name 'default'"),
        ("cluster: {heartbeatInterval: 5, heartbeatTimeout: 5}",
         "config cluster.heartbeatTimeout: expected number > cluster.heartbeatInterval (5), got 5"),
        ("cluster: {heartbeatInterval: 20}",
         "config cluster.heartbeatTimeout: expected number > cluster.heartbeatInterval (20), got 15"),
        ("engine: {centerRegistry: center.local}",
         "config engine.centerRegistry: expected host:port, got 'center.local'"),
        ("engine: {centerRegistry: 6786}",
         "config engine.centerRegistry: expected string, got integer"),
        ("engine: {luavm: {redis: [{addr: 'redis:abc'}]}}",
         "config engine.luavm.redis[0].addr: expected host:port, got 'redis:abc'"),
        ("licenses: {activationCode: [a]}",
         "config licenses.activationCode: expected scalar, got list"),
        ("engine: {servers: [{readBufferSize: {a: 1}}]}",
         "config engine.servers[0].readBufferSize: expected scalar, got mapping"),
        ("engine: {servers: [{tls: {privateKey: k.pem}}]}",
         "config engine.servers[0].tls.certificate: missing required key"),
    ],
)
def test_validation_errors(workdir: Path, text: str, expected: str) -> None:
    assert error_of(workdir, text) == expected


def test_whole_file_validated_whatever_the_role(workdir: Path) -> None:
    assert error_of(workdir, "engine: {servers: [{port: abc}]}", "center") == (
        "config engine.servers[0].port: expected integer, got string"
    )
    assert error_of(workdir, "center: {registry: {bind: 1}}", "engine") == (
        "config center.registry.bind: expected string, got integer"
    )


def test_first_error_in_file_order_wins(workdir: Path) -> None:
    assert error_of(workdir, "logging: {level: loud}\nengine: {apiServer: {port: -1}}") == (
        "config logging.level: expected one of debug, info, warn, error, got 'loud'"
    )


def test_config_error_attributes() -> None:
    err = ConfigError("engine.servers[0].port", "expected integer, got string")
    assert (err.path, err.problem) == ("engine.servers[0].port", "expected integer, got string")
    assert str(err) == "config engine.servers[0].port: expected integer, got string"
    assert str(ConfigError("", "cannot read /x: No such file or directory")) == (
        "config: cannot read /x: No such file or directory"
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("nothing.yaml", cwd=str(tmp_path))
    assert info.value.path == ""
    missing = tmp_path / "nothing.yaml"
    assert str(info.value) == f"config: cannot read {missing}: No such file or directory"


def test_invalid_yaml(workdir: Path) -> None:
    message = error_of(workdir, "logging:\n  level: info\n   format: text\n")
    assert message.startswith(f"config: invalid YAML in {workdir / 'connmix.yaml'}: line 3: ")
    assert "\n" not in message


def test_unknown_role_is_a_programming_error(workdir: Path) -> None:
    assert ROLES == ("center", "engine", "dev", "single")
    with pytest.raises(ValueError):
        parse_config({}, role="proxy", cwd=str(workdir))


# --------------------------------------------------------------------------- roles and ports


def test_listeners_per_role(workdir: Path) -> None:
    config = load(workdir, "engine: {servers: [{port: 7000}, {port: 7001}]}")
    paths = {role: [path for path, _ in listeners(config, role)] for role in ROLES}
    center = ["center.registry", "center.apiServer"]
    engine = ["engine.meshPoint", "engine.apiServer", "engine.servers[0]", "engine.servers[1]"]
    both = center + engine
    assert paths == {"center": center, "engine": engine, "dev": both, "single": both}
    kinds = [type(item) for _, item in listeners(config, "dev")]
    assert kinds == [ListenerConfig] * 3 + [ApiServerConfig] + [ServerConfig] * 2


def test_port_clash_between_center_and_engine_depends_on_role(workdir: Path) -> None:
    text = "center: {apiServer: {port: 6789}}"
    assert load(workdir, text, "center").center.api_server.port == 6789
    assert load(workdir, text, "engine").engine.api_server.port == 6789
    for role in ("dev", "single"):
        assert error_of(workdir, text, role) == (
            "config engine.apiServer.port: port 6789 already used by center.apiServer"
        )


def test_port_clash_between_engine_servers(workdir: Path) -> None:
    text = "engine: {servers: [{}, {port: 6790}]}"
    assert error_of(workdir, text, "engine") == (
        "config engine.servers[1].port: port 6790 already used by engine.servers[0]"
    )
    assert len(load(workdir, text, "center").engine.servers) == 2


def test_server_port_may_equal_center_port_for_center_role(tmp_path: Path) -> None:
    config = load(tmp_path, "engine: {servers: [{port: 6787}]}", role="center")
    assert config.engine.servers[0].port == config.center.api_server.port


# --------------------------------------------------------------------------- TLS


def test_tls_files_resolved_and_checked(workdir: Path) -> None:
    (workdir / "server.pem").write_text("dummy")
    (workdir / "ca.pem").write_text("dummy")
    config = load(workdir, """
        engine:
          servers:
            - tls: {certificate: server.pem}
        center:
          registry:
            tls: {certificate: server.pem, caCertificates: ca.pem}
    """)
    server = config.engine.servers[0]
    pem = str(workdir / "server.pem")
    assert server.tls == TLSConfig(pem, pem, None)
    assert server.address == "tls://0.0.0.0:6790"
    assert config.center.registry.tls == TLSConfig(pem, pem, str(workdir / "ca.pem"))
    assert config.center.registry.address == "tls://0.0.0.0:6786"
    assert config.center.api_server.address == "0.0.0.0:6787"


def test_tls_missing_certificate(workdir: Path) -> None:
    assert error_of(workdir, "engine: {meshPoint: {tls: {certificate: nope.pem}}}") == (
        f"config engine.meshPoint.tls.certificate: file not found: {workdir / 'nope.pem'}"
    )


def test_tls_missing_private_key(workdir: Path) -> None:
    (workdir / "cert.pem").write_text("dummy")
    text = "center: {apiServer: {tls: {certificate: cert.pem, privateKey: key.pem}}}"
    assert error_of(workdir, text) == (
        f"config center.apiServer.tls.privateKey: file not found: {workdir / 'key.pem'}"
    )


# --------------------------------------------------------------------------- reload


def test_reload_diff_hot_and_restart_keys(workdir: Path) -> None:
    old = load(workdir, "")
    new = load(workdir, """
        logging: {level: debug}
        access: {users: [{username: a, password: b}]}
        engine:
          apiServer: {port: 7789, readTimeout: 5}
          servers:
            - options: [{name: path, value: /ws}]
              byteCodeExpires: 0
              protocol: socket
    """)
    hot, cold = reload_diff(old, new)
    assert hot == [
        "logging.level",
        "access.users",
        "engine.apiServer.readTimeout",
        "engine.servers[0].options[0]",
        "engine.servers[0].byteCodeExpires",
    ]
    assert cold == ["engine.apiServer.port", "engine.servers[0].protocol"]


def test_reload_diff_list_length_and_tls(workdir: Path) -> None:
    (workdir / "cert.pem").write_text("dummy")
    old = load(workdir, "")
    new = load(workdir, """
        engine:
          servers: [{}, {port: 7000}]
          meshPoint: {tls: {certificate: cert.pem}}
    """)
    assert reload_diff(old, new) == ([], ["engine.meshPoint.tls", "engine.servers"])
    assert reload_diff(old, load(workdir, "")) == ([], [])
