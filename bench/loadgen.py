"""The load generator: picows clients on uvloop, run as a process of its own (issue 6).

Each scenario keeps a bounded window of messages in flight (so queues never overflow and
nothing is measured while buffers grow), runs a warm-up, then counts what arrives during a
fixed measuring time.  Prints one JSON object: ``{"rate": messages per second, ...}``.

    python bench/loadgen.py inbound  --clients ws://127.0.0.1:P --api ws://127.0.0.1:A/ws/v1
    python bench/loadgen.py echo     --clients ws://127.0.0.1:P
    python bench/loadgen.py push     --clients ws://... --api ws://.../ws/v1
    python bench/loadgen.py rawpush  --clients ws://... --api ws://.../ctl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, Callable

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PAYLOAD = b"x" * 32


class Counter(WSListener):
    """Counts data frames and calls ``on_frame`` for each."""

    def __init__(self, on_frame: Callable[[WSFrame], None]) -> None:
        self.on_frame = on_frame
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.on_frame(frame)


class Meter:
    """Counts arrivals; ``measure`` returns the rate over the measuring window."""

    def __init__(self) -> None:
        self.count = 0

    async def measure(self, warmup: float, duration: float) -> float:
        await asyncio.sleep(warmup)
        start_count, start = self.count, time.perf_counter()
        await asyncio.sleep(duration)
        return (self.count - start_count) / (time.perf_counter() - start)


async def connect_many(url: str, count: int, on_frame: Callable[[int, WSFrame], None]) -> list[WSTransport]:
    transports = []
    for index in range(count):
        transport, _ = await ws_connect(lambda i=index: Counter(lambda f, i=i: on_frame(i, f)), url)
        transports.append(transport)
    return transports


async def inbound(args: Any, echo: bool) -> dict:
    """Clients send; the consumer (engine) or the clients themselves (echo baseline) count."""
    meter, window = Meter(), args.window
    state = {"sent": 0, "next": 0}
    clients: list[WSTransport] = []

    def refill() -> None:
        while state["sent"] - meter.count < window and clients:
            clients[state["next"]].send(WSMsgType.TEXT, PAYLOAD)
            state["next"] = (state["next"] + 1) % len(clients)
            state["sent"] += 1

    def arrived(*_: Any) -> None:
        meter.count += 1
        refill()

    if echo:
        clients.extend(await connect_many(args.clients, args.n, arrived))
    else:
        api, _ = await ws_connect(lambda: Counter(lambda f: arrived()), args.api)
        api.send(WSMsgType.TEXT, b'{"method":"queue.consume","params":["foo"],"id":1}')
        await asyncio.sleep(0.2)
        meter.count -= 1  # the consume reply
        clients.extend(await connect_many(args.clients, args.n, lambda i, f: None))
    refill()
    rate = await meter.measure(args.warmup, args.duration)
    return {"rate": rate, "clients": args.n}


async def push(args: Any, raw: bool) -> dict:
    """One back-end connection asks the server to send to the clients, round robin."""
    meter, window = Meter(), args.window
    state = {"asked": 0, "answered": 0, "next": 0}
    ids: list[Any] = []

    clients = await connect_many(args.clients, args.n, lambda i, f: setattr(meter, "count", meter.count + 1))
    learnt: asyncio.Future = asyncio.get_running_loop().create_future()

    def reply(frame: WSFrame) -> None:
        if not learnt.done():
            event = json.loads(frame.get_payload_as_bytes())
            if event.get("event") == "queue.consume":
                ids.append(event["result"]["client_id"])
                if len(ids) == len(clients):
                    learnt.set_result(True)
            return
        state["answered"] += 1
        refill()

    api, _ = await ws_connect(lambda: Counter(reply), args.api)
    if raw:
        ids.extend(range(len(clients)))
        learnt.set_result(True)
    else:
        api.send(WSMsgType.TEXT, b'{"method":"queue.consume","params":["foo"],"id":0}')
        for client in clients:  # each client announces itself once: its id arrives as an event
            client.send(WSMsgType.TEXT, b"hello")
    await asyncio.wait_for(learnt, 30)
    if not raw:
        api.send(WSMsgType.TEXT, b'{"method":"queue.unconsume","params":[],"id":0}')
        await asyncio.sleep(0.2)
    requests = [
        (json.dumps({"c": i, "d": "x" * 32}) if raw else json.dumps(
            {"method": "mesh.send", "params": [{"client_id": i, "data": "x" * 32}], "id": 1})).encode()
        for i in ids
    ]

    def refill() -> None:
        while state["asked"] - state["answered"] < window:
            api.send(WSMsgType.TEXT, requests[state["next"]])
            state["next"] = (state["next"] + 1) % len(requests)
            state["asked"] += 1

    refill()
    rate = await meter.measure(args.warmup, args.duration)
    return {"rate": rate, "clients": args.n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["inbound", "echo", "push", "rawpush"])
    parser.add_argument("--clients", required=True)
    parser.add_argument("--api", default="")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    scenarios = {
        "inbound": lambda: inbound(args, echo=False),
        "echo": lambda: inbound(args, echo=True),
        "push": lambda: push(args, raw=False),
        "rawpush": lambda: push(args, raw=True),
    }
    result = uvloop.run(scenarios[args.scenario]())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
