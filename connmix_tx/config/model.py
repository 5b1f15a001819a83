"""The frozen configuration model: one dataclass per section of the file, and ``ConfigError``.

These are the objects the rest of the engine reads (``config.engine.api_server.port``...).  They
are built only by the schema walker (``connmix_tx.config.schema``) and never change afterwards; a
reload builds a whole new ``Config``.  Every key, its default and whether a reload applies it is
listed in docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_WORKERS", "ROLES", "AccessConfig", "AnyListener", "ApiServerConfig", "CenterConfig",
    "ClusterConfig", "Config", "ConfigError", "EngineConfig", "HostPort", "ListenerConfig",
    "LoggingConfig", "LuaVMConfig", "QueueConfig", "RedisConfig", "ServerConfig", "TLSConfig",
    "UserConfig",
]

ROLES = ("center", "engine", "dev", "single")
#: Upper bound of ``engine.workers`` and ``-p``.
MAX_WORKERS = 64


class ConfigError(Exception):
    """A configuration problem at one key path (``""`` when it is about the file itself)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"config {self.path}: {self.problem}" if self.path else f"config: {self.problem}"


class _Address:
    """Mixin for listener sections: the ``address`` text of the start-up log lines
    (docs/operations.md, "Logging")."""

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
    """``access``: API users and protected mode (docs/api.md, "Authentication and roles")."""

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
