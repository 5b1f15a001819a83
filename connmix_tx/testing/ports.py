"""Free TCP ports of 127.0.0.1, for tests, benchmarks and the conformance run that start processes."""

from __future__ import annotations

import random
import socket

#: Listen ports are drawn below the kernel's ephemeral range (32768-60999 on Linux): a port of that
#: range may be taken by any outgoing connection on the machine between the check and the bind,
#: which a busy shared test machine makes likely enough to matter.
LOW, HIGH = 20000, 32000


def free_ports(count: int, consecutive: bool = False) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that were free a moment ago (``consecutive``:
    a run of neighbouring ports).

    All ports are bound before any is released, so they differ from each other; another process
    may still take one before it is used (good enough on a test machine).
    """
    for _ in range(200):
        if consecutive:
            base = random.randrange(LOW, HIGH - count)
            ports = list(range(base, base + count))
        else:
            ports = random.sample(range(LOW, HIGH), count)
        sockets = []
        try:
            for port in ports:
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return ports
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} free ports between {LOW} and {HIGH}")


def free_port() -> int:
    """One TCP port of 127.0.0.1 that was free a moment ago (nothing listens there now)."""
    return free_ports(1)[0]
