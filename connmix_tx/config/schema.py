"""The schema table: every key of the configuration file, in one place.

``_SCHEMA`` names each key, its type and range, its raw YAML default and whether a reload applies
it; the same table drives validation (``walk``), the built-in defaults and the reload comparison
(``reload_diff``), so they cannot drift apart.  docs/configuration.md documents every key of it
(tests/test_docs.py checks that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, cast

from connmix_tx.config.model import (
    MAX_WORKERS, AccessConfig, ApiServerConfig, CenterConfig, ClusterConfig, Config, ConfigError,
    EngineConfig, ListenerConfig, LoggingConfig, LuaVMConfig, QueueConfig, RedisConfig, ServerConfig,
    TLSConfig, UserConfig,
)
from connmix_tx.config.walker import (
    COLD, HOT, NEW_CONNS, REQUIRED, Bool, Coerced, Context, Enum, Field, Float, HostPortNode, Int, List,
    Map, Node, Path, Str, join, show,
)

__all__ = ["reload_diff", "walk"]


def _build_tls(kw: dict[str, Any], path: str) -> TLSConfig:
    certificate = kw["certificate"]
    return TLSConfig(certificate, kw["private_key"] or certificate, kw["ca_certificates"])


def _build_user(kw: dict[str, Any], path: str) -> UserConfig:
    roles = set(kw["roles"])
    if "write" in roles:
        roles.add("read")
    kw["roles"] = tuple(r for r in ("read", "write") if r in roles)
    return UserConfig(**kw)


def _build_cluster(kw: dict[str, Any], path: str) -> ClusterConfig:
    interval, timeout = kw["heartbeat_interval"], kw["heartbeat_timeout"]
    if timeout <= interval:
        expected = f"number > cluster.heartbeatInterval ({show(interval)})"
        problem = f"expected {expected}, got {show(timeout)}"
        raise ConfigError(join(path, "heartbeatTimeout"), problem)
    return ClusterConfig(**kw)


def _build_option(kw: dict[str, Any], path: str) -> tuple[str, str]:
    return (kw["name"], kw["value"])


_PORT = Int(1, 65535)
_TLS = Map(_build_tls, (
    Field("certificate", Path(), REQUIRED),
    Field("privateKey", Path(), None),
    Field("caCertificates", Path(), None),
))


def _listener(build: type, port: int, *extra: Field, unused: Iterable[str] = ()) -> Map:
    """A listener section: ``bind``, ``port``, optional ``tls`` (all cold), then ``extra``."""
    common = (Field("bind", Str(), "0.0.0.0", COLD), Field("port", _PORT, port, COLD),
              Field("tls", _TLS, None, COLD))
    return Map(build, common + extra, unused)


_SERVER = Map(ServerConfig, (
    Field("protocol", Enum("websocket", "socket"), "websocket"),
    Field("bind", Str(), "0.0.0.0"),
    Field("port", _PORT, 6790),
    Field("entry", Path(), "lua/entry.websocket.lua"),
    Field("options", List(Map(_build_option, (Field("name", Str(non_empty=True), REQUIRED),
                                                 Field("value", Coerced(), REQUIRED)))),
           [{"name": "path", "value": "/"}], NEW_CONNS),
    Field("byteCodeExpires", Int(0), 10, HOT),
    Field("readTimeout", Int(0), 60, NEW_CONNS),
    Field("writeTimeout", Int(0), 10, NEW_CONNS),
    Field("maxMessageSize", Int(16), 65536, NEW_CONNS),
    Field("maxWriteBuffer", Int(4096), 1048576, NEW_CONNS),
    Field("compression", Bool(), False, NEW_CONNS),
    Field("tls", _TLS, None),
), unused=("readBufferSize", "writeBufferSize"))

_REDIS = Map(RedisConfig, (
    Field("name", Str(non_empty=True), "default"),
    Field("addr", HostPortNode(), "127.0.0.1:6379"),
    Field("password", Str(), ""),
    Field("db", Int(0), 0),
    Field("poolSize", Int(1), 20),
    Field("minIdleConns", Int(0), 10),
    Field("maxConnAge", Int(0), 0),
    Field("idleTimeout", Int(0), 300),
))

_SCHEMA = Map(Config, (
    Field("logging", Map(LoggingConfig, (
        Field("filename", Path(allow_empty=True), ""),
        Field("maxFiles", Int(1), 7),
        Field("level", Enum("debug", "info", "warn", "error"), "info", HOT),
        Field("format", Enum("text", "json"), "text", HOT),
    )), {}),
    Field("access", Map(AccessConfig, (
        Field("users", List(Map(_build_user, (
            Field("username", Str(non_empty=True), REQUIRED),
            Field("password", Str(), REQUIRED),
            Field("roles", List(Enum("read", "write")), ["read"]),
            Field("host", Str(), "*"),
        ))), []),
        Field("protected", Bool(), True),
    )), {}, HOT),
    Field("cluster", Map(_build_cluster, (
        Field("secret", Str(), ""),
        Field("heartbeatInterval", Float(0), 5),
        Field("heartbeatTimeout", Float(0), 15),
        Field("meshTimeout", Float(0), 5),
        Field("registerTimeout", Float(0), 10),
        Field("numberReserve", Float(0, inclusive=True), 60),
    )), {}),
    Field("center", Map(CenterConfig, (
        Field("registry", _listener(ListenerConfig, 6786), {}),
        Field("apiServer", _listener(ListenerConfig, 6787), {}),
    )), {}),
    Field("engine", Map(EngineConfig, (
        Field("centerRegistry", HostPortNode(), "127.0.0.1:6786"),
        Field("advertiseHost", Str(), ""),
        Field("meshPoint", _listener(ListenerConfig, 6788), {}),
        Field("apiServer", _listener(
            ApiServerConfig, 6789,
            Field("readTimeout", Int(0), 60, NEW_CONNS),
            Field("writeTimeout", Int(0), 60, NEW_CONNS),
            Field("maxMessageSize", Int(1024), 524288, NEW_CONNS),
            Field("maxWriteBuffer", Int(65536), 4194304, NEW_CONNS),
            unused=("readBufferSize", "writeBufferSize")), {}),
        Field("luavm", Map(LuaVMConfig, (
            Field("maxInstructions", Int(0), 10000000, HOT),
            Field("maxMemory", Int(16), 256),
            Field("queue", Map(QueueConfig, (
                Field("topicSize", Int(1), 2000),
                Field("maxTopics", Int(1), 100),
                Field("backend", Enum("memory", "redis"), "memory", COLD),
                Field("redis", Str(non_empty=True), "default", COLD),
                Field("prefix", Str(), "connmix:queue:", COLD),
                Field("ackTimeout", Float(0), 30),
            )), {}, HOT),
            Field("redis", List(_REDIS, unique="name"), [{}]),
        )), {}),
        Field("servers", List(_SERVER), [{}]),
        Field("workers", Int(0, MAX_WORKERS), 1),
    )), {}),
    Field("licenses", Map(None, unused=("activationCode", "server")), None, keep=False),
    Field("prometheus", Map(None, (
        Field("summary", Map(None, unused=("maxAge", "ageBuckets", "bufCap")), None, keep=False),
    )), None, keep=False),
))


def walk(data: object, cwd: str | None) -> Config:
    """Validate ``data`` against the schema (the role-independent checks); build the ``Config``."""
    ctx = Context(cwd)
    config = cast(Config, _SCHEMA.parse(data, "", ctx))
    _check_queue(config)
    return dataclasses.replace(config, unused_keys=tuple(ctx.unused))


def _check_queue(config: Config) -> None:
    """The ``redis`` queue backend needs a ``luavm.redis`` entry of the name it gives."""
    luavm = config.engine.luavm
    if luavm.queue.backend == "redis" and luavm.queue.redis not in {r.name for r in luavm.redis}:
        raise ConfigError("engine.luavm.queue.redis",
                          f"no engine.luavm.redis entry is named {show(luavm.queue.redis)}")


def reload_diff(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Compare two configs key by key: ``(changed hot key paths, changed restart-only key paths)``.

    "new conns" keys count as hot.  A list whose length changed is reported as the list's own
    path; a ``tls`` section added or removed as ``<listener>.tls``.
    """
    hot: list[str] = []
    cold: list[str] = []

    def visit(node: Node, a: Any, b: Any, path: str, hotness: str) -> None:
        if isinstance(node, Map) and dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            for key, field in node.fields.items():
                if field.keep:
                    visit(field.node, getattr(a, field.attr), getattr(b, field.attr),
                          join(path, key), field.hot or hotness)
        elif isinstance(node, List) and len(a) == len(b):
            for index, (item_a, item_b) in enumerate(zip(a, b)):
                visit(node.item, item_a, item_b, f"{path}[{index}]", hotness)
        elif a != b:
            (cold if hotness == COLD else hot).append(path)

    visit(_SCHEMA, old, new, "", COLD)
    return hot, cold
