"""Churn soak: thousands of connect / send / disconnect cycles against the real service tree.

Clients open a WebSocket to the protocol server, talk a little and leave in four ways (a close
handshake after an echo, a close while their Lua callback waits in ``wait_context_value``, a TCP
abort without any close frame, and a close right after the handshake).  Meanwhile a back-end
consumes the queue the script pushes into, and short-lived API connections consume and leave.
Afterwards every registry of the engine must be empty and memory must not have grown.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import in_asyncio, loopback_config, start_engine

#: Subscribes to two channels, pushes to a queue and echoes; "wait" suspends the callback until
#: the connection closes (``wait_context_value`` then returns nil, "closed").
CHURN_ENTRY = r"""
function on_handshake(client_id, headers, server)
  mix.websocket():set_context_value("since", os.time())
end

function on_message(msg)
  local conn = mix.websocket()
  if msg.data == "wait" then
    conn:send("waiting")
    local value, err = conn:wait_context_value("never")
    return
  end
  conn:subscribe("room" .. (#msg.data % 8), "all")
  mix.queue.push("churn", {msg = msg.data, ctx = conn:context()})
  conn:send(msg.data)
end

function on_close(client_id, err)
end
"""

CYCLES = 3000
WARMUP = 300
WORKERS = 16
DEADLINE = 30.0  # seconds for all cycles; the soak stops early (and says so) on a slow machine
MIN_MEASURED = 1000  # cycles that must run after warm-up for the memory check to mean something
#: Growth allowed after warm-up.  See ``test_churn_leaves_empty_registries_and_flat_memory``.
PYTHON_GROWTH_BOUND = 1024 * 1024
#: A short idle timeout: the idle wheel forgets a closed connection only when its deadline comes
#: (see ``test_closed_connection_is_released_before_its_idle_deadline``), so the soak lets every
#: deadline pass before it measures.
READ_TIMEOUT = 1
LUA_GROWTH_BOUND = 512 * 1024


async def one_cycle(url: str, index: int) -> None:
    """One client life; its kind depends on ``index`` (deterministic)."""
    kind = index % 4
    async with websockets.connect(url, ping_interval=None, close_timeout=2) as ws:
        if kind == 3:
            return  # handshake, then a clean close
        text = "wait" if kind == 1 else f"hello-{index}"
        await ws.send(text)
        reply = await asyncio.wait_for(ws.recv(), 5)
        assert reply == ("waiting" if kind == 1 else text)
        if kind == 2:
            ws.transport.abort()  # connection lost: no close frame at all


async def api_cycle(url: str, index: int) -> None:
    """A short-lived back-end: consume, ping, leave (its consumption must be removed)."""
    async with websockets.connect(url, ping_interval=None, close_timeout=2) as api:
        await api.send(json.dumps({"method": "queue.consume", "params": [f"side{index % 3}"], "id": 1}))
        assert json.loads(await asyncio.wait_for(api.recv(), 5))["result"] == {"success": True}


async def run_cycles(url: str, api_url: str, first: int, last: int, deadline: float) -> int:
    """Run cycles ``first`` .. ``last - 1`` on ``WORKERS`` workers; return how many ran."""
    counter = iter(range(first, last))
    done = 0

    async def worker() -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        for index in counter:
            if loop.time() > deadline:
                return
            await one_cycle(url, index)
            if index % 50 == 0:
                await api_cycle(api_url, index)
            done += 1

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return done


async def drain(api: Any, stop: asyncio.Event, seen: list[int]) -> None:
    """The back-end consumer: read events until told to stop."""
    while not stop.is_set():
        try:
            raw = await asyncio.wait_for(api.recv(), 0.2)
        except asyncio.TimeoutError:
            continue
        event = json.loads(raw)
        if event.get("event") == "queue.consume":
            seen.append(1)


def registries(engine: Any) -> dict[str, int]:
    """Sizes of everything that must be empty once every connection has gone."""
    service = engine.service.engine
    queues = service.queues
    return {
        "connections": len(service.connections.by_id),
        "channels": len(service.connections.channels),
        "consumers": sum(len(t.consumers) for t in queues.topics.values()),
        "consuming": len(queues._consuming),
        "waiting": sum(script.waiting for script in service.scripts),
        "idle_watched": sum(len(f.wheel) for f in service.client_factories),
        "client_protocols": sum(len(f.open_protocols) for f in service.client_factories),
        "api_protocols": len(service.api_factory.open_protocols),
    }


async def settled(engine: Any, backend: int, timeout: float = 10.0) -> dict[str, int]:
    """Wait until every registry is empty but for ``backend`` consuming API connections.

    Returns the sizes seen last (the caller asserts on them), after ``timeout`` at most.
    """
    expected = {key: 0 for key in registries(engine)}
    expected.update(consumers=backend, consuming=backend, api_protocols=backend)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        sizes = registries(engine)
        if sizes == expected or loop.time() > end:
            return sizes
        await asyncio.sleep(0.05)


def lua_memory(engine: Any) -> int:
    """Bytes used by the Lua runtimes after a full Lua garbage collection."""
    total = 0
    for script in engine.service.engine.scripts:
        runtime = script.runtime
        runtime.execute('collectgarbage("collect"); collectgarbage("collect")')
        total += runtime.get_memory_used()
    return total


@in_asyncio
async def test_churn_leaves_empty_registries_and_flat_memory(tmp_path: Path) -> None:
    """3000 client lives (bounded to 30 s), then: registries empty, memory flat.

    Memory bound: Python heap growth (tracemalloc, traced from after a 300-cycle warm-up to after
    the last cycle, both after ``gc.collect()``) below 1 MiB, Lua heap growth below 512 KiB.
    One connection's engine state (protocol, ``ClientConnection``, ``CallbackSession``, context,
    Lua coroutine) is several KiB, so leaking one per cycle over the >= 1000 measured cycles
    would exceed the bound many times over; a leak of 1 KiB per cycle exceeds it too.  What
    remains legitimately after warm-up is bounded and small: dict / free-list high-water marks,
    asyncio and Twisted internals, the Snowflake state.  Allocations made by ``twisted.logger``
    (its bounded buffer of recent events, not ours) are left out of the comparison.
    """
    entry = tmp_path / "churn.lua"
    entry.write_text(CHURN_ENTRY)
    engine = await start_engine(
        loopback_config(entry=str(entry), byte_code_expires=0, read_timeout=READ_TIMEOUT)
    )
    url = engine.client_url
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + DEADLINE
    seen: list[int] = []
    stop = asyncio.Event()
    try:
        api = await websockets.connect(engine.api_url, ping_interval=None, max_queue=None)
        await api.send(json.dumps({"method": "queue.consume", "params": ["churn"], "id": 1}))
        assert json.loads(await api.recv())["result"] == {"success": True}
        consumer = asyncio.ensure_future(drain(api, stop, seen))

        warm = await run_cycles(url, engine.api_url, 0, WARMUP, deadline)
        assert warm == WARMUP
        warmup_time = loop.time() - started
        sizes = await settled(engine, backend=1)
        assert sizes["connections"] == 0, sizes
        gc.collect()
        lua_before = lua_memory(engine)
        tracemalloc.start(1)
        try:
            python_before = tracemalloc.take_snapshot()
            measured = await run_cycles(url, engine.api_url, WARMUP, CYCLES, deadline)
            elapsed = loop.time() - started
            sizes = await settled(engine, backend=1)
            # Past every idle deadline; everything sent to the consumer has been read.
            await asyncio.sleep(READ_TIMEOUT + 0.6)
            gc.collect()
            python_after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        lua_after = lua_memory(engine)

        stop.set()
        await consumer
        await api.close()
        final = await settled(engine, backend=0)
    finally:
        await engine.stop()

    keep = [tracemalloc.Filter(False, "*/twisted/logger/*"), tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = python_before.filter_traces(keep), python_after.filter_traces(keep)
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"churn: {WARMUP} warm-up cycles in {warmup_time:.1f} s, then {measured} in "
          f"{elapsed - warmup_time:.1f} s; {len(seen)} queue events; python heap {growth:+d} B, "
          f"lua heap {lua_after - lua_before:+d} B")
    assert measured >= MIN_MEASURED, f"only {measured} cycles after warm-up within {DEADLINE} s"
    # The consumer received one event per echoing client (kinds 0 and 2): no message is lost.
    assert len(seen) == sum(1 for i in range(WARMUP + measured) if i % 4 in (0, 2))

    expected = {key: 0 for key in sizes}
    assert sizes == {**expected, "consumers": 1, "consuming": 1, "api_protocols": 1}, sizes
    assert final == expected, final

    top = "\n".join(str(stat) for stat in after.compare_to(before, "lineno")[:8])
    assert growth < PYTHON_GROWTH_BOUND, f"python heap grew {growth} bytes over {measured} cycles:\n{top}"
    assert lua_after - lua_before < LUA_GROWTH_BOUND, f"lua heap grew {lua_after - lua_before} bytes"


@in_asyncio
async def test_closed_connection_is_released_before_its_idle_deadline() -> None:
    """A client that left is garbage as soon as its callbacks finished, not at its idle deadline.

    Under churn the engine otherwise holds rate x readTimeout dead connections (100 per second
    for 60 s is 6000 protocols, tens of MiB) although every registry is already empty.
    """
    engine = await start_engine(loopback_config())  # readTimeout 60: far away
    try:
        async with websockets.connect(engine.client_url) as ws:
            await ws.send("hello")
            await asyncio.sleep(0.1)
            factory = engine.service.engine.client_factories[0]
            (proto,) = factory.open_protocols
            released = weakref.ref(proto)
            del proto
        sizes = await settled(engine, backend=0, timeout=5)
        assert sizes["connections"] == 0, sizes
        gc.collect()
        assert released() is None, [type(r).__name__ for r in gc.get_referrers(released())]
    finally:
        await engine.stop()
