"""Shared fixtures: the real service tree in this process, on port 0 of 127.0.0.1.

Tests drive it with the independent ``websockets`` client; Twisted runs on the asyncio reactor
(``--reactor=asyncio`` in pytest.ini), so both share one event loop.  ``in_asyncio`` turns an
``async def`` test written against asyncio into one pytest-twisted can run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from connmix_tx.config import AccessConfig, Config, UserConfig, default_config

REPO = Path(__file__).resolve().parent.parent

#: Fixtures of helper modules, available to every test: ``redis_address``.
pytest_plugins = ["redisservers"]


def in_asyncio(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an asyncio coroutine test (using ``websockets``) under pytest-twisted."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await Deferred.fromFuture(asyncio.ensure_future(fn(*args, **kwargs)))

    return pytest_twisted.ensureDeferred(wrapper)


async def wait_for(deferred: Deferred, timeout: float = 5.0) -> Any:
    """Await a Twisted Deferred from asyncio code, bounded in time."""
    return await asyncio.wait_for(deferred.asFuture(asyncio.get_running_loop()), timeout)


def maybe_deferred(result: Any) -> Deferred:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(lambda: result)


def loopback_config(**server_overrides: Any) -> Config:
    """The default configuration with every listener on 127.0.0.1 port 0.

    ``server_overrides`` replace fields of ``engine.servers[0]`` (e.g. ``read_timeout=1``).
    """
    config = default_config(cwd=str(REPO))

    def here(listener: Any, **extra: Any) -> Any:
        return dataclasses.replace(listener, bind="127.0.0.1", port=0, **extra)

    servers = tuple(here(s, **server_overrides) for s in config.engine.servers)
    return dataclasses.replace(
        config,
        center=dataclasses.replace(
            config.center, registry=here(config.center.registry), api_server=here(config.center.api_server)
        ),
        engine=dataclasses.replace(
            config.engine,
            mesh_point=here(config.engine.mesh_point),
            api_server=here(config.engine.api_server),
            servers=servers,
        ),
    )


def with_users(config: Config) -> Config:
    """``config`` in protected mode with one user, alice / s3cret, who may read and write."""
    alice = UserConfig("alice", "s3cret", ("read", "write"), "*")
    return dataclasses.replace(config, access=AccessConfig(users=(alice,), protected=True))


@dataclasses.dataclass
class RunningEngine:
    """A started dev-mode service tree and the addresses of its listeners."""

    service: Any
    fatal_calls: list[tuple[int, str]]

    async def stop(self) -> None:
        """Stop the service tree (from asyncio code)."""
        await wait_for(maybe_deferred(self.service.stopService()))
        assert self.fatal_calls == []

    @property
    def client_url(self) -> str:
        return f"ws://127.0.0.1:{self.service.engine.protocol_listeners[0].actual_port}"

    @property
    def api_url(self) -> str:
        return f"ws://127.0.0.1:{self.service.engine.api_listener.actual_port}/ws/v1"

    @property
    def api_port(self) -> int:
        return self.service.engine.api_listener.actual_port

    @property
    def center_api_port(self) -> int:
        return self.service.center.api_listener.actual_port


async def start_engine(config: Config) -> RunningEngine:
    """Start center + engine in this process and wait until the protocol server listens.

    An asyncio coroutine; pair it with ``running.stop()``.
    """
    from twisted.internet import reactor

    from connmix_tx.service import ConnmixService

    fatal_calls: list[tuple[int, str]] = []
    service = ConnmixService(config, "dev", reactor, lambda code, message: fatal_calls.append((code, message)))
    service.privilegedStartService()
    service.startService()
    await wait_for(service.engine.center_link.registered)
    return RunningEngine(service, fatal_calls)


@pytest_twisted.async_yield_fixture
async def engine() -> Any:
    """A dev-mode engine with the default entry script (idle timeout as configured: 60 s)."""
    running = await Deferred.fromFuture(asyncio.ensure_future(start_engine(loopback_config())))
    yield running
    await running.service.stopService()
    assert running.fatal_calls == []


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a TCP port that was free a moment ago (for subprocess tests)."""
    from connmix_tx.testing import free_port as pick

    return pick
