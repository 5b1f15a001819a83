"""The configuration file: YAML in, frozen typed objects out.

One table (``schema._SCHEMA``) describes every key of the file: its YAML name, its type and range,
its default and whether a SIGHUP reload applies it.  A small walker reads the YAML data against
that table, rejects unknown keys, fills in defaults and builds one frozen dataclass per section.
Defaults are written in the table as raw YAML values and go through the same walker, so the
built-in defaults and ``etc/connmix.yaml`` cannot drift apart silently.  docs/configuration.md
documents every key.

Checks that depend on the role being started (duplicate listener ports, entry scripts and TLS
files that must exist) run after the walk, over ``listeners(config, role)``.  Every problem is a
``ConfigError`` carrying the dotted key path (``engine.servers[1].options[0].value``), printed as
``config <path>: <problem>``; the first problem found stops the load.

The rooms of the package:

* ``model``: the frozen dataclasses, ``HostPort`` and ``ConfigError``;
* ``walker``: the node types of the schema and how they validate raw YAML;
* ``schema``: the one schema table, the walk over it and the reload comparison (``reload_diff``);
* ``roles``: the listeners each role opens and the checks on them (ports, worker mesh ports, files);
* ``loading``: reading the file (``load_config``, ``parse_config``, ``default_config``).

Import every name from ``connmix_tx.config``; the submodules are the package's own business.
"""

from __future__ import annotations

from connmix_tx.config.loading import default_config, load_config, parse_config
from connmix_tx.config.model import (
    MAX_WORKERS, ROLES, AccessConfig, AnyListener, ApiServerConfig, CenterConfig, ClusterConfig, Config,
    ConfigError, EngineConfig, HostPort, ListenerConfig, LoggingConfig, LuaVMConfig, QueueConfig,
    RedisConfig, ServerConfig, TLSConfig, UserConfig,
)
from connmix_tx.config.roles import device_cpus, listeners, worker_count, worker_mesh_ports
from connmix_tx.config.schema import reload_diff

__all__ = [
    "MAX_WORKERS", "ROLES", "AccessConfig", "AnyListener", "ApiServerConfig", "CenterConfig",
    "ClusterConfig", "Config", "ConfigError", "EngineConfig", "HostPort", "ListenerConfig",
    "LoggingConfig", "LuaVMConfig", "QueueConfig", "RedisConfig", "ServerConfig", "TLSConfig",
    "UserConfig", "default_config", "device_cpus", "listeners", "load_config", "parse_config",
    "reload_diff", "worker_count", "worker_mesh_ports",
]
