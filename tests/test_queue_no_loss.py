"""No message lost, none duplicated: a consumer leaves in the middle of a stream (docs/queues.md).

A protocol client streams N messages through the default entry script into queue ``foo``; a
consumer takes part of them and leaves while the stream is still running; a second consumer
(joining afterwards, or competing from the start) must receive every message the first one did
not, exactly once and in push order.  The guarantee is *at most once*: a message leaves the queue
when it is written to a consumer's transport, so only a consumer that vanishes without a close
handshake may lose the messages already on its wire; every other way of leaving loses nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets

from conftest import in_asyncio, loopback_config, start_engine

N = 500
LEAVE_AFTER = 100  # events the first consumer reads before it leaves
CONSUME = '{"method":"queue.consume","params":["foo"],"id":"consume"}'


def index_of(raw: str | bytes) -> int | None:
    """The message number of a queue event (``m<i>``), or None for a reply."""
    message = json.loads(raw)
    if message.get("event") != "queue.consume":
        return None
    return int(message["result"]["data"]["msg"]["data"][1:])


async def produce(client: Any, progress: list[int]) -> None:
    """Stream ``m0`` .. ``m<N-1>``, paced so the stream outlasts the first consumer."""
    for i in range(N):
        await client.send(f"m{i}")
        progress.append(i)
        if i % 10 == 9:
            await asyncio.sleep(0.005)


async def consume(url: str) -> Any:
    api = await websockets.connect(url, max_queue=None, ping_interval=None)
    await api.send(CONSUME)
    while index_of(reply := await asyncio.wait_for(api.recv(), 5)) is not None:
        pass
    assert json.loads(reply)["result"] == {"success": True}
    return api


async def read_events(api: Any, into: list[int], count: int | None = None, quiet: float = 1.0) -> None:
    """Append event numbers to ``into`` until ``count`` are there, or nothing came for ``quiet`` s."""
    while count is None or len(into) < count:
        try:
            raw = await asyncio.wait_for(api.recv(), quiet)
        except (asyncio.TimeoutError, websockets.ConnectionClosed):
            return
        number = index_of(raw)
        if number is not None:
            into.append(number)


async def leave(api: Any, how: str, into: list[int]) -> None:
    """The first consumer leaves; events that reach it on the way out are still its own."""
    if how == "unconsume":
        await api.send('{"method":"queue.unconsume","params":[],"id":"bye"}')
        while (number := index_of(raw := await asyncio.wait_for(api.recv(), 5))) is not None:
            into.append(number)
        assert json.loads(raw) == {"error": None, "result": {"success": True}, "id": "bye"}
        await api.close()
    elif how == "close":
        # Start the close handshake, then read what the server wrote before its close frame.
        await asyncio.wait_for(api.close(), 5)
        await read_events(api, into)
    else:  # "abort": the TCP connection vanishes, no close frame
        api.transport.abort()


def check(first: list[int], second: list[int], lost: int = 0) -> None:
    assert first == sorted(first) and second == sorted(second), "a consumer saw messages out of order"
    assert not set(first) & set(second), f"duplicates: {sorted(set(first) & set(second))[:10]}"
    missing = sorted(set(range(N)) - set(first) - set(second))
    assert len(missing) == lost, f"{len(missing)} messages lost: {missing[:20]}"
    assert len(first) + len(second) + lost == N


async def run_stream(how: str, second_from_start: bool) -> tuple[list[int], list[int], Any]:
    engine = await start_engine(loopback_config())
    first: list[int] = []
    second: list[int] = []
    progress: list[int] = []
    try:
        async with websockets.connect(engine.client_url) as client:
            a = await consume(engine.api_url)
            b = await consume(engine.api_url) if second_from_start else None
            producer = asyncio.ensure_future(produce(client, progress))
            reader_b = asyncio.ensure_future(read_events(b, second, quiet=3)) if b is not None else None
            await read_events(a, first, LEAVE_AFTER, quiet=5)
            assert len(first) == LEAVE_AFTER
            sent_when_leaving = len(progress)
            await leave(a, how, first)
            await asyncio.wait_for(producer, 30)
            assert sent_when_leaving < N, "the stream had ended before the consumer left"
            if b is None:
                b = await consume(engine.api_url)
                await read_events(b, second, quiet=3)
            else:
                assert reader_b is not None
                await reader_b
            await b.close()
            queues = engine.service.engine.queues
            assert queues.length("foo") == 0
            delivered = queues.delivered
    finally:
        await engine.stop()
    return first, second, delivered


@pytest.mark.parametrize("second_from_start", [False, True], ids=["joins-later", "competing"])
@in_asyncio
async def test_unconsume_mid_stream_loses_nothing(second_from_start: bool) -> None:
    first, second, delivered = await run_stream("unconsume", second_from_start)
    check(first, second)
    assert delivered == N


@pytest.mark.parametrize("second_from_start", [False, True], ids=["joins-later", "competing"])
@in_asyncio
async def test_close_handshake_mid_stream_loses_nothing(second_from_start: bool) -> None:
    first, second, delivered = await run_stream("close", second_from_start)
    print(f"close: first {len(first)}, second {len(second)}")
    check(first, second)
    assert delivered == N


@in_asyncio
async def test_vanished_consumer_loses_at_most_what_was_on_its_wire() -> None:
    """At most once: without a close handshake the events already written to the first consumer
    are gone; every message still in the queue reaches the second one, in order, once."""
    first, second, delivered = await run_stream("abort", second_from_start=False)
    print(f"abort: first {len(first)}, second {len(second)}, lost {N - len(first) - len(second)}")
    lost = N - len(first) - len(second)
    check(first, second, lost)
    # Nothing vanished inside the engine: every message was written to some consumer.
    assert delivered == N
    # What was lost is one contiguous run right after the first consumer's last message, and
    # the second consumer has everything after it.
    if second:
        assert second == list(range(second[0], N))
        assert first[-1] + lost + 1 == second[0]


@in_asyncio
async def test_messages_pushed_while_the_server_closes_a_consumer_are_not_dropped() -> None:
    """A server-initiated close (here: its user was removed, 4001) must not swallow the messages
    dispatched during its close handshake: they stay in the topic for the next consumer."""
    engine = await start_engine(loopback_config())
    try:
        a = await consume(engine.api_url)
        (proto,) = engine.service.engine.api_factory.open_protocols
        queues = engine.service.engine.queues
        proto.close_removed_user()  # what a SIGHUP that removes the connection's user does
        queues.push("foo", "", b'{"msg":{"data":"m0"}}')  # in the same reactor turn
        await asyncio.sleep(0.2)  # the dispatch runs; the close handshake completes
        got: list[int] = []
        await read_events(a, got, quiet=0.5)
        b = await consume(engine.api_url)
        await read_events(b, got, quiet=1)
        await b.close()
        assert got == [0], "the message pushed during the close handshake was lost"
    finally:
        await engine.stop()
