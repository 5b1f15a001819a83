"""The configuration file: YAML in, frozen typed objects out (SPEC section 3).

One table (``_SCHEMA``) describes every key of the file: its YAML name, its type and range, its
default and whether a SIGHUP reload applies it ("Hot" column of SPEC 3.1).  A small walker reads
the YAML data against that table, rejects unknown keys, fills in defaults and builds one frozen
dataclass per section.  Defaults are written in the table as raw YAML values and go through the
same walker, so the built-in defaults and ``etc/connmix.yaml`` cannot drift apart silently.

Checks that depend on the role being started (duplicate listener ports, entry scripts and TLS
files that must exist) run after the walk, over ``listeners(config, role)``.  Every problem is a
``ConfigError`` carrying the dotted key path (``engine.servers[1].options[0].value``), printed as
``config <path>: <problem>`` (SPEC 3.3); the first problem found stops the load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import yaml

from connmix_tx import home

__all__ = [
    "ROLES", "AccessConfig", "AnyListener", "ApiServerConfig", "CenterConfig", "ClusterConfig", "Config",
    "ConfigError", "EngineConfig", "HostPort", "ListenerConfig", "LoggingConfig", "LuaVMConfig",
    "QueueConfig", "RedisConfig", "ServerConfig", "TLSConfig", "UserConfig", "default_config",
    "listeners", "load_config", "parse_config", "reload_diff",
]

ROLES = ("center", "engine", "dev", "single")
#: Upper bound of ``engine.workers`` and ``-p``.
MAX_WORKERS = 64


def device_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(workers: int) -> int:
    """The number of worker processes ``engine.workers`` / ``-p`` asks for (``0``: one per CPU)."""
    return workers if workers > 0 else min(device_cpus(), MAX_WORKERS)


class ConfigError(Exception):
    """A configuration problem at one key path (``""`` when it is about the file itself)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"config {self.path}: {self.problem}" if self.path else f"config: {self.problem}"


# --------------------------------------------------------------------------- config objects


class _Address:
    """Mixin for listener sections: the ``address`` text of the start-up log lines (SPEC 2.4)."""

    __slots__ = ()
    bind: str
    port: int
    tls: TLSConfig | None

    @property
    def address(self) -> str:
        """``bind:port``, prefixed with ``tls://`` when the listener serves TLS."""
        return f"{'tls://' if self.tls is not None else ''}{self.bind}:{self.port}"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """A listener's ``tls`` section: absolute PEM paths (``private_key`` defaults to the cert)."""

    certificate: str
    private_key: str
    ca_certificates: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerConfig(_Address):
    """``center.registry``, ``center.apiServer`` and ``engine.meshPoint``."""

    bind: str
    port: int
    tls: TLSConfig | None = None


@dataclass(frozen=True, slots=True)
class ApiServerConfig(_Address):
    """``engine.apiServer``: the engine API listener and its per-connection limits."""

    bind: str
    port: int
    tls: TLSConfig | None
    read_timeout: int
    write_timeout: int
    max_message_size: int
    max_write_buffer: int


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``logging``; ``filename`` is absolute, or empty for no log file."""

    filename: str
    max_files: int
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One ``access.users[]`` entry; ``roles`` is normalised (``write`` implies ``read``)."""

    username: str
    password: str
    roles: tuple[str, ...]
    host: str


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """``access``: API users and protected mode (SPEC 10)."""

    users: tuple[UserConfig, ...]
    protected: bool


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``cluster``: PB secret and cluster timings, in seconds."""

    secret: str
    heartbeat_interval: float
    heartbeat_timeout: float
    mesh_timeout: float
    register_timeout: float
    number_reserve: float


@dataclass(frozen=True, slots=True)
class CenterConfig:
    """``center``: the two center listeners."""

    registry: ListenerConfig
    api_server: ListenerConfig


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed ``host:port`` (or ``[v6]:port``) address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port`` / ``[::1]:port``; raise ``ValueError`` when it does not parse."""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if not rest.startswith(":"):
                raise ValueError(text)
            port_text = rest[1:]
        else:
            host, _, port_text = text.rpartition(":")
            if ":" in host:
                raise ValueError(text)
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(text)
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``engine.luavm.queue``: queue capacities, backend and acknowledgement timeout."""

    topic_size: int
    max_topics: int
    backend: str = "memory"
    redis: str = "default"
    prefix: str = "connmix:queue:"
    ack_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """One ``engine.luavm.redis[]`` connection for ``mix.redis``."""

    name: str
    addr: HostPort
    password: str
    db: int
    pool_size: int
    min_idle_conns: int
    max_conn_age: int
    idle_timeout: int


@dataclass(frozen=True, slots=True)
class LuaVMConfig:
    """``engine.luavm``: Lua limits, queues and Redis connections."""

    max_instructions: int
    max_memory: int
    queue: QueueConfig
    redis: tuple[RedisConfig, ...]


@dataclass(frozen=True, slots=True)
class ServerConfig(_Address):
    """One ``engine.servers[]`` protocol server; ``entry`` is an absolute path."""

    protocol: str
    bind: str
    port: int
    entry: str
    options: tuple[tuple[str, str], ...]
    byte_code_expires: int
    read_timeout: int
    write_timeout: int
    max_message_size: int
    max_write_buffer: int
    compression: bool
    tls: TLSConfig | None = None

    def option(self, name: str) -> str | None:
        """Return the value of the first option called ``name``, or ``None``."""
        for key, value in self.options:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """``engine``: the engine listeners, Lua VM settings and protocol servers."""

    center_registry: HostPort
    advertise_host: str
    mesh_point: ListenerConfig
    api_server: ApiServerConfig
    luavm: LuaVMConfig
    servers: tuple[ServerConfig, ...]
    #: Worker processes of this engine (``0``: one per CPU); see ``worker_count``.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file.  ``unused_keys``: compatibility keys present in it (one warning each)."""

    logging: LoggingConfig
    access: AccessConfig
    cluster: ClusterConfig
    center: CenterConfig
    engine: EngineConfig
    source: str | None = None
    unused_keys: tuple[str, ...] = ()


AnyListener: TypeAlias = ListenerConfig | ApiServerConfig | ServerConfig


# --------------------------------------------------------------------------- schema walker

_REQUIRED = object()          # field default: the key must be present
# Hotness of a key (SPEC 3.1 "Hot" column); a field without one inherits its parent's.
_HOT, _NEW_CONNS, _COLD = "hot", "new conns", "no"


def _type_name(value: object) -> str:
    """The YAML type name used in "got ..." texts."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"),
                       (str, "string"), (list, "list"), (dict, "mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _show(value: object) -> str:
    """A value as shown after "got" in a range or enum problem."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Context:
    """State of one walk: where relative paths resolve, and the unused keys met so far."""

    def __init__(self, cwd: str | None) -> None:
        self.cwd = cwd
        self.unused: list[str] = []


class _Node:
    """One kind of value in the schema; ``parse`` validates raw YAML and returns the typed value."""

    def parse(self, value: Any, path: str, ctx: _Context) -> Any:
        raise NotImplementedError


def _wrong_type(path: str, expected: str, value: object) -> ConfigError:
    return ConfigError(path, f"expected {expected}, got {_type_name(value)}")


class _Int(_Node):
    """An integer (booleans and floats rejected) within optional bounds."""

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def parse(self, value: Any, path: str, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, "integer", value)
        low = self.minimum is not None and value < self.minimum
        high = self.maximum is not None and value > self.maximum
        if low or high:
            if self.maximum is not None:
                bounds = f" {self.minimum}-{self.maximum}"
            else:
                bounds = f" >= {self.minimum}"
            raise ConfigError(path, f"expected integer{bounds}, got {_show(value)}")
        return value


class _Float(_Node):
    """A finite number (integers accepted) above ``minimum`` (strictly, unless ``inclusive``)."""

    def __init__(self, minimum: float, inclusive: bool = False) -> None:
        self.minimum, self.inclusive = minimum, inclusive

    def parse(self, value: Any, path: str, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(path, "number", value)
        ok = value >= self.minimum if self.inclusive else value > self.minimum
        if not ok or not math.isfinite(value):
            op = ">=" if self.inclusive else ">"
            expected = f"number {op} {_show(self.minimum)}"
            raise ConfigError(path, f"expected {expected}, got {_show(value)}")
        return float(value)


class _Bool(_Node):
    """A YAML boolean."""

    def parse(self, value: Any, path: str, ctx: _Context) -> bool:
        if not isinstance(value, bool):
            raise _wrong_type(path, "boolean", value)
        return value


class _Str(_Node):
    """A string, optionally required to be non-empty."""

    def __init__(self, non_empty: bool = False) -> None:
        self.non_empty = non_empty

    def parse(self, value: Any, path: str, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _wrong_type(path, "string", value)
        if self.non_empty and not value:
            raise ConfigError(path, "expected non-empty string, got ''")
        return value


class _Enum(_Node):
    """One of a fixed set of strings."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def parse(self, value: Any, path: str, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _wrong_type(path, "string", value)
        if value not in self.choices:
            expected = ", ".join(self.choices)
            raise ConfigError(path, f"expected one of {expected}, got {_show(value)}")
        return value


class _Path(_Node):
    """A file path, made absolute with ``home.resolve_path`` (working directory, then home)."""

    def __init__(self, allow_empty: bool = False) -> None:
        self.text = _Str(non_empty=not allow_empty)

    def parse(self, value: Any, path: str, ctx: _Context) -> str:
        text = self.text.parse(value, path, ctx)
        return home.resolve_path(text, ctx.cwd) if text else ""


class _HostPortNode(_Node):
    """A ``host:port`` string."""

    def parse(self, value: Any, path: str, ctx: _Context) -> HostPort:
        text = _Str().parse(value, path, ctx)
        try:
            return HostPort.parse(text)
        except ValueError:
            raise ConfigError(path, f"expected host:port, got {_show(text)}") from None


class _Coerced(_Node):
    """Any scalar but null, coerced to a string (``servers[].options[].value``)."""

    def parse(self, value: Any, path: str, ctx: _Context) -> str:
        if value is None or isinstance(value, (list, dict)):
            raise _wrong_type(path, "string", value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


class _List(_Node):
    """A list of ``item`` values, as a tuple; ``unique`` names an attribute that must not repeat."""

    def __init__(self, item: _Node, unique: str | None = None) -> None:
        self.item, self.unique = item, unique

    def parse(self, value: Any, path: str, ctx: _Context) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _wrong_type(path, "list", value)
        items: list[Any] = []
        for index, raw in enumerate(value):
            item = self.item.parse(raw, f"{path}[{index}]", ctx)
            if self.unique is not None:
                key = getattr(item, self.unique)
                if any(getattr(seen, self.unique) == key for seen in items):
                    problem = f"duplicate {self.unique} {_show(key)}"
                    raise ConfigError(f"{path}[{index}].{self.unique}", problem)
            items.append(item)
        return tuple(items)


@dataclass(frozen=True)
class _Field:
    """One key of a mapping: YAML name, value node, raw default and hotness (None: inherited)."""

    key: str
    node: _Node
    default: Any
    hot: str | None = None
    keep: bool = True          # False: validated but not stored (compatibility sections)

    @property
    def attr(self) -> str:
        return re.sub(r"(?<!^)([A-Z])", r"_\1", self.key).lower()


class _Map(_Node):
    """A mapping with known keys; ``build(kwargs, path)`` turns the values into the section object.

    ``unused`` lists connmix keys accepted for compatibility: any scalar, recorded, not stored.
    A null mapping counts as an empty one (a section whose body is all commented out).
    """

    def __init__(self, build: Callable[..., Any] | None, fields: Iterable[_Field] = (),
                 unused: Iterable[str] = ()) -> None:
        self.build = build
        self.fields = {f.key: f for f in fields}
        self.unused = frozenset(unused)

    def parse(self, value: Any, path: str, ctx: _Context) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _wrong_type(path, "mapping", value)
        values: dict[str, Any] = {}
        for key, raw in value.items():
            sub = _join(path, key)
            if key in self.unused:
                if isinstance(raw, (list, dict)):
                    raise _wrong_type(sub, "scalar", raw)
                ctx.unused.append(sub)
                continue
            field = self.fields.get(key) if isinstance(key, str) else None
            if field is None:
                raise ConfigError(sub, "unknown key")
            if raw is None and field.default is None:
                values[key] = None      # explicit null on an optional section: absent
            else:
                values[key] = field.node.parse(raw, sub, ctx)
        for key, field in self.fields.items():
            if key in values:
                continue
            if field.default is _REQUIRED:
                raise ConfigError(_join(path, key), "missing required key")
            if field.default is None:
                values[key] = None
            else:
                values[key] = field.node.parse(field.default, _join(path, key), ctx)
        if self.build is None:
            return None
        kwargs = {f.attr: values[k] for k, f in self.fields.items() if f.keep}
        if isinstance(self.build, type):
            return self.build(**kwargs)
        return self.build(kwargs, path)


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
        expected = f"number > cluster.heartbeatInterval ({_show(interval)})"
        problem = f"expected {expected}, got {_show(timeout)}"
        raise ConfigError(_join(path, "heartbeatTimeout"), problem)
    return ClusterConfig(**kw)


def _build_option(kw: dict[str, Any], path: str) -> tuple[str, str]:
    return (kw["name"], kw["value"])


_PORT = _Int(1, 65535)
_TLS = _Map(_build_tls, (
    _Field("certificate", _Path(), _REQUIRED),
    _Field("privateKey", _Path(), None),
    _Field("caCertificates", _Path(), None),
))


def _listener(build: type, port: int, *extra: _Field, unused: Iterable[str] = ()) -> _Map:
    """A listener section: ``bind``, ``port``, optional ``tls`` (all cold), then ``extra``."""
    common = (_Field("bind", _Str(), "0.0.0.0", _COLD), _Field("port", _PORT, port, _COLD),
              _Field("tls", _TLS, None, _COLD))
    return _Map(build, common + extra, unused)


_SERVER = _Map(ServerConfig, (
    _Field("protocol", _Enum("websocket", "socket"), "websocket"),
    _Field("bind", _Str(), "0.0.0.0"),
    _Field("port", _PORT, 6790),
    _Field("entry", _Path(), "lua/entry.websocket.lua"),
    _Field("options", _List(_Map(_build_option, (_Field("name", _Str(non_empty=True), _REQUIRED),
                                                 _Field("value", _Coerced(), _REQUIRED)))),
           [{"name": "path", "value": "/"}], _NEW_CONNS),
    _Field("byteCodeExpires", _Int(0), 10, _HOT),
    _Field("readTimeout", _Int(0), 60, _NEW_CONNS),
    _Field("writeTimeout", _Int(0), 10, _NEW_CONNS),
    _Field("maxMessageSize", _Int(16), 65536, _NEW_CONNS),
    _Field("maxWriteBuffer", _Int(4096), 1048576, _NEW_CONNS),
    _Field("compression", _Bool(), False, _NEW_CONNS),
    _Field("tls", _TLS, None),
), unused=("readBufferSize", "writeBufferSize"))

_REDIS = _Map(RedisConfig, (
    _Field("name", _Str(non_empty=True), "default"),
    _Field("addr", _HostPortNode(), "127.0.0.1:6379"),
    _Field("password", _Str(), ""),
    _Field("db", _Int(0), 0),
    _Field("poolSize", _Int(1), 20),
    _Field("minIdleConns", _Int(0), 10),
    _Field("maxConnAge", _Int(0), 0),
    _Field("idleTimeout", _Int(0), 300),
))

_SCHEMA = _Map(Config, (
    _Field("logging", _Map(LoggingConfig, (
        _Field("filename", _Path(allow_empty=True), ""),
        _Field("maxFiles", _Int(1), 7),
        _Field("level", _Enum("debug", "info", "warn", "error"), "info", _HOT),
        _Field("format", _Enum("text", "json"), "text", _HOT),
    )), {}),
    _Field("access", _Map(AccessConfig, (
        _Field("users", _List(_Map(_build_user, (
            _Field("username", _Str(non_empty=True), _REQUIRED),
            _Field("password", _Str(), _REQUIRED),
            _Field("roles", _List(_Enum("read", "write")), ["read"]),
            _Field("host", _Str(), "*"),
        ))), []),
        _Field("protected", _Bool(), True),
    )), {}, _HOT),
    _Field("cluster", _Map(_build_cluster, (
        _Field("secret", _Str(), ""),
        _Field("heartbeatInterval", _Float(0), 5),
        _Field("heartbeatTimeout", _Float(0), 15),
        _Field("meshTimeout", _Float(0), 5),
        _Field("registerTimeout", _Float(0), 10),
        _Field("numberReserve", _Float(0, inclusive=True), 60),
    )), {}),
    _Field("center", _Map(CenterConfig, (
        _Field("registry", _listener(ListenerConfig, 6786), {}),
        _Field("apiServer", _listener(ListenerConfig, 6787), {}),
    )), {}),
    _Field("engine", _Map(EngineConfig, (
        _Field("centerRegistry", _HostPortNode(), "127.0.0.1:6786"),
        _Field("advertiseHost", _Str(), ""),
        _Field("meshPoint", _listener(ListenerConfig, 6788), {}),
        _Field("apiServer", _listener(
            ApiServerConfig, 6789,
            _Field("readTimeout", _Int(0), 60, _NEW_CONNS),
            _Field("writeTimeout", _Int(0), 60, _NEW_CONNS),
            _Field("maxMessageSize", _Int(1024), 524288, _NEW_CONNS),
            _Field("maxWriteBuffer", _Int(65536), 4194304, _NEW_CONNS),
            unused=("readBufferSize", "writeBufferSize")), {}),
        _Field("luavm", _Map(LuaVMConfig, (
            _Field("maxInstructions", _Int(0), 10000000, _HOT),
            _Field("maxMemory", _Int(16), 256),
            _Field("queue", _Map(QueueConfig, (
                _Field("topicSize", _Int(1), 2000),
                _Field("maxTopics", _Int(1), 100),
                _Field("backend", _Enum("memory", "redis"), "memory", _COLD),
                _Field("redis", _Str(non_empty=True), "default", _COLD),
                _Field("prefix", _Str(), "connmix:queue:", _COLD),
                _Field("ackTimeout", _Float(0), 30),
            )), {}, _HOT),
            _Field("redis", _List(_REDIS, unique="name"), [{}]),
        )), {}),
        _Field("servers", _List(_SERVER), [{}]),
        _Field("workers", _Int(0, MAX_WORKERS), 1),
    )), {}),
    _Field("licenses", _Map(None, unused=("activationCode", "server")), None, keep=False),
    _Field("prometheus", _Map(None, (
        _Field("summary", _Map(None, unused=("maxAge", "ageBuckets", "bufCap")), None, keep=False),
    )), None, keep=False),
))


# --------------------------------------------------------------------------- public functions


def _walk(data: object, cwd: str | None) -> Config:
    """Validate ``data`` against the schema (the role-independent checks); build the ``Config``."""
    ctx = _Context(cwd)
    config = cast(Config, _SCHEMA.parse(data, "", ctx))
    _check_queue(config)
    return dataclasses.replace(config, unused_keys=tuple(ctx.unused))


def _check_queue(config: Config) -> None:
    """The ``redis`` queue backend needs a ``luavm.redis`` entry of the name it gives."""
    luavm = config.engine.luavm
    if luavm.queue.backend == "redis" and luavm.queue.redis not in {r.name for r in luavm.redis}:
        raise ConfigError("engine.luavm.queue.redis",
                          f"no engine.luavm.redis entry is named {_show(luavm.queue.redis)}")


def _check_file(path: str, filename: str) -> None:
    """Raise ``ConfigError`` at ``path`` unless ``filename`` is an existing readable file."""
    if not os.path.exists(filename):
        raise ConfigError(path, f"file not found: {filename}")
    if not os.path.isfile(filename):
        raise ConfigError(path, f"not a regular file: {filename}")
    try:
        with open(filename, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(path, f"cannot read {filename}: {exc.strerror or exc}") from None


def _check_role(config: Config, role: str, workers: int | None = None) -> None:
    """The checks that depend on the listeners the role opens: unique ports, then files.

    With N worker processes the mesh point needs N ports (``worker_mesh_ports``); ``workers``
    overrides ``engine.workers`` (``-p``).
    """
    opened = listeners(config, role)
    owners: dict[int, str] = {}
    for path, listener in opened:
        if listener.port in owners:
            problem = f"port {listener.port} already used by {owners[listener.port]}"
            raise ConfigError(f"{path}.port", problem)
        owners[listener.port] = path
    count = worker_count(config.engine.workers if workers is None else workers)
    if role != "center" and count > 1:
        last = worker_mesh_ports(config, role, count)[-1]
        if last > 65535:
            raise ConfigError("engine.meshPoint.port",
                              f"with {count} workers the mesh point needs {count} free ports from "
                              f"{config.engine.mesh_point.port}, beyond 65535")
    for path, listener in opened:
        if isinstance(listener, ServerConfig):
            _check_file(f"{path}.entry", listener.entry)
        tls = listener.tls
        if tls is not None:
            _check_file(f"{path}.tls.certificate", tls.certificate)
            if tls.private_key != tls.certificate:
                _check_file(f"{path}.tls.privateKey", tls.private_key)
            if tls.ca_certificates is not None:
                _check_file(f"{path}.tls.caCertificates", tls.ca_certificates)


def parse_config(data: object, role: str = "dev", cwd: str | None = None,
                 source: str | None = None, workers: int | None = None) -> Config:
    """Validate parsed YAML ``data`` for ``role`` and return the ``Config``.

    The whole file is validated whatever the role; duplicate ports, entry scripts and TLS files
    are checked only for the listeners ``role`` opens.  Relative paths resolve against ``cwd``
    (default: the working directory), then the home directory.  ``workers`` (``-p``) overrides
    ``engine.workers`` for the mesh port range check only; the returned config keeps the file's
    value.  Raises ``ConfigError``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {', '.join(ROLES)}")
    config = _walk(data, cwd)
    _check_role(config, role, workers)
    return dataclasses.replace(config, source=source)


def load_config(path: str | None = None, role: str = "dev", cwd: str | None = None,
                workers: int | None = None) -> Config:
    """Read and validate the YAML file ``path`` (default ``<home>/etc/connmix.yaml``).

    A relative ``path`` is taken from ``cwd``.  An empty file means all defaults.  Raises
    ``ConfigError`` with an empty key path when the file cannot be read or is not valid YAML.
    """
    filename = os.path.abspath(os.path.join(cwd or os.getcwd(), path or home.default_config_path()))
    try:
        with open(filename, "rb") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read {filename}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML in {filename}: {_yaml_problem(exc)}") from None
    return parse_config(data, role=role, cwd=cwd, source=filename, workers=workers)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line describing a YAML error: ``line N: <problem>``."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}: {' '.join(problem.split())}"


def default_config(cwd: str | None = None) -> Config:
    """The built-in defaults (what an empty file gives), without any file checks."""
    return _walk({}, cwd)


def listeners(config: Config, role: str) -> list[tuple[str, AnyListener]]:
    """The listeners ``role`` opens, with their key paths, in start-up order (SPEC 2.4)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}, expected one of {', '.join(ROLES)}")
    result: list[tuple[str, AnyListener]] = []
    if role != "engine":
        center = config.center
        result += [("center.registry", center.registry), ("center.apiServer", center.api_server)]
    if role != "center":
        engine = config.engine
        result += [("engine.meshPoint", engine.mesh_point), ("engine.apiServer", engine.api_server)]
        result += [(f"engine.servers[{i}]", server) for i, server in enumerate(engine.servers)]
    return result


def worker_mesh_ports(config: Config, role: str, count: int) -> list[int]:
    """The mesh port of each of ``count`` workers (docs/workers.md): worker 0 takes
    ``meshPoint.port``, each next worker the next port up that no other listener of ``role`` uses,
    so the packaged ports (mesh 6788, API 6789, protocol 6790) give 6788, 6791, 6792, ..."""
    first = config.engine.mesh_point.port
    taken = {listener.port for path, listener in listeners(config, role) if path != "engine.meshPoint"}
    ports: list[int] = []
    port = first
    while len(ports) < count:
        if port not in taken:
            ports.append(port)
        port += 1
    return ports


def reload_diff(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """Compare two configs key by key: ``(changed hot key paths, changed restart-only key paths)``.

    "new conns" keys count as hot.  A list whose length changed is reported as the list's own
    path; a ``tls`` section added or removed as ``<listener>.tls``.
    """
    hot: list[str] = []
    cold: list[str] = []

    def visit(node: _Node, a: Any, b: Any, path: str, hotness: str) -> None:
        if isinstance(node, _Map) and dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            for key, field in node.fields.items():
                if field.keep:
                    visit(field.node, getattr(a, field.attr), getattr(b, field.attr),
                          _join(path, key), field.hot or hotness)
        elif isinstance(node, _List) and len(a) == len(b):
            for index, (item_a, item_b) in enumerate(zip(a, b)):
                visit(node.item, item_a, item_b, f"{path}[{index}]", hotness)
        elif a != b:
            (cold if hotness == _COLD else hot).append(path)

    visit(_SCHEMA, old, new, "", _COLD)
    return hot, cold
