"""Free TCP ports of 127.0.0.1, for tests, benchmarks and the conformance run that start processes."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that were free a moment ago.

    All sockets are bound before any is closed, so the ports differ from each other; another
    process may still take one before it is used (good enough on a test machine).
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One TCP port of 127.0.0.1 that was free a moment ago (nothing listens there now)."""
    return free_ports(1)[0]
