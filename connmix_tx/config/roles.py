"""The checks that depend on the role being started, and the listeners each role opens.

After the schema walk, ``check_role`` looks at the listeners the role opens (``listeners``):
no two on one port, the mesh port range of the worker processes (``worker_mesh_ports``, see
docs/workers.md) within 65535, and the entry scripts and TLS files present and readable.
"""

from __future__ import annotations

import os

from connmix_tx.config.model import MAX_WORKERS, ROLES, AnyListener, Config, ConfigError, ServerConfig

__all__ = ["check_role", "device_cpus", "listeners", "worker_count", "worker_mesh_ports"]


def device_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(workers: int) -> int:
    """The number of worker processes ``engine.workers`` / ``-p`` asks for (``0``: one per CPU)."""
    return workers if workers > 0 else min(device_cpus(), MAX_WORKERS)


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


def check_role(config: Config, role: str, workers: int | None = None) -> None:
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


def listeners(config: Config, role: str) -> list[tuple[str, AnyListener]]:
    """The listeners ``role`` opens, with their key paths, in start-up order (docs/operations.md,
    "Logging")."""
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
