"""The load generator: picows clients on uvloop, run as a process of its own (issue 6).

Each throughput scenario keeps a bounded window of work in flight (so no queue overflows and
nothing is measured while buffers grow), warms up, counts what arrives during a fixed measuring
time, then stops sending and lets what is in flight drain.  Scenarios:

``inbound``    clients send; the engine's Lua pushes to queue foo; API consumers count events.
``echo``       clients send to the raw echo server and count the echoes (baseline of inbound).
``push``       an API connection sends ``mesh.send`` round robin to the clients, which count.
``relay``      clients send to clients through Lua ``mix.mesh.send`` (``bench/entry.relay.lua``).
``rawpush``    the same against ``raw_server.py push`` (``{"c": index, "d": text}`` on /ctl).
``publish``    an API connection sends ``mesh.publish`` to channel ``bench``; subscribers count.
``rawfanout``  the same against ``raw_server.py fanout`` (prepared frame to every client).
``handshake``  workers open a WebSocket, and reset it as soon as the handshake is done.
``idle``       opens ``--n`` connections and holds them (memory and connection-count rows).

Alone it sets up, measures once and prints one JSON object (``{"rate": ...}``).  With
``--serve`` (how ``bench/run.py`` drives it) it sets up, prints ``{"ready": true, ...}`` and then
answers commands read from stdin, one JSON line each, until ``quit`` or end of input:

    run         one throughput measurement (warm-up, measure, drain)
    lat RATE    latency at a fixed RATE (messages/s): p50 / p99 in milliseconds

    python bench/loadgen.py inbound  --clients ws://127.0.0.1:P --api ws://127.0.0.1:A/ws/v1
    python bench/loadgen.py echo     --clients ws://127.0.0.1:P
    python bench/loadgen.py push     --clients ws://... --api ws://.../ws/v1 [--learn-api ws://...]
    python bench/loadgen.py rawpush  --clients ws://... --api ws://.../ctl
    python bench/loadgen.py publish  --clients ws://... --api ws://.../ws/v1 --n 10000
    python bench/loadgen.py idle     --clients ws://... --n 5000 --serve

``--clients`` and ``--api`` may be repeated (inbound over two engines: one consumer per engine,
clients spread over the engines).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PAYLOAD = b"x" * 32
#: A latency probe carries its send time (perf_counter_ns) as ``t<20 digits>``.
STAMP = re.compile(rb"t(\d{20})")
#: How long a stopped load may take to drain what it has in flight.
DRAIN_SECONDS = 3.0
CHANNEL = "bench"


def stamp() -> bytes:
    """A 32-byte payload holding the current time (``STAMP``)."""
    return b"t%020d" % time.perf_counter_ns() + b"x" * 11


def stamp_text() -> str:
    return stamp().decode()


class Listener(WSListener):
    """Calls ``on_frame(frame)`` for every data frame."""

    def __init__(self, on_frame: Callable[[WSFrame], None]) -> None:
        self.on_frame = on_frame

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.on_frame(frame)


#: ``--source``: the local address connections are made from (None: the system's choice).
SOURCE: str | None = None


async def connect(url: str, on_frame: Callable[[WSFrame], None]) -> WSTransport:
    # One source address has one ephemeral port range (about 28,000 ports) per destination: more
    # connections to one port need more sources (any 127.x.y.z is loopback on Linux).
    extra = {"local_addr": (SOURCE, 0)} if SOURCE else {}
    transport, _ = await ws_connect(lambda: Listener(on_frame), url, websocket_handshake_timeout=30, **extra)
    linger_zero(transport.underlying_transport.get_extra_info("socket"))
    return transport


def linger_zero(sock: Any) -> None:
    """Close ``sock`` with a reset whenever it closes (also when the process ends): no TIME_WAIT
    left behind to use up the ephemeral ports of the next runs."""
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def connect_many(
    urls: list[str], count: int, on_frame: Callable[[int, WSFrame], None], parallel: int = 64,
    deadline: float | None = None,
) -> tuple[list[WSTransport], int]:
    """Open ``count`` connections spread round robin over ``urls``, ``parallel`` at a time.

    Returns the connections in index order (failed ones left out) and the number of failures.
    Stops early at ``deadline`` (perf_counter) or after 100 failures in a row.
    """
    opened: dict[int, WSTransport] = {}
    state = {"next": 0, "failed": 0, "in_a_row": 0}

    async def worker() -> None:
        while state["next"] < count and state["in_a_row"] < 100:
            if deadline is not None and time.perf_counter() > deadline:
                return
            index = state["next"]
            state["next"] += 1
            try:
                opened[index] = await connect(urls[index % len(urls)], lambda f, i=index: on_frame(i, f))
                state["in_a_row"] = 0
            except Exception:  # noqa: BLE001 (refused, reset, fd limit, timeout: each one counts)
                state["failed"] += 1
                state["in_a_row"] += 1

    await asyncio.gather(*(worker() for _ in range(min(parallel, max(count, 1)))))
    return [opened[i] for i in sorted(opened)], state["failed"]


def reset(transport: WSTransport) -> None:
    """Close with a TCP reset (``connect`` set SO_LINGER 0): no close handshake, no TIME_WAIT."""
    transport.disconnect(graceful=False)


def percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "samples": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "samples": len(ordered)}


class Scenario:
    """A closed-loop load: ``send_one`` puts work in flight, ``arrived`` counts it done.

    ``window`` bounds the work in flight (in units: messages, or deliveries for publish).
    In latency mode (``lat``) the load is paced instead and every arrival carries a stamp.
    """

    window = 1000

    def __init__(self, args: Any) -> None:
        self.args = args
        self.window = args.window
        self.sent = self.done = 0
        #: What really arrived (``done`` also counts requests that failed, to free the window).
        self.arrivals = 0
        self.errors = 0
        self.running = False
        self.latencies: list[float] | None = None

    async def setup(self) -> dict:
        return {}

    def send_one(self, probe: bool) -> int:
        """Send one request (``probe``: stamped); return the units of work it puts in flight."""
        raise NotImplementedError

    async def start(self) -> None:
        """Before a measurement (e.g. start consuming)."""

    async def stop(self) -> None:
        """After a measurement has drained."""

    def fill(self) -> None:
        while self.running and self.sent - self.done < self.window:
            self.sent += self.send_one(False)

    def arrived(self, frame: WSFrame | None = None, units: int = 1) -> None:
        self.done += units
        self.arrivals += units
        if self.latencies is not None and frame is not None:
            found = STAMP.search(frame.get_payload_as_bytes())
            if found:
                self.latencies.append(time.perf_counter_ns() - int(found.group(1)))
            return
        self.fill()

    async def drain(self) -> int:
        self.running = False
        deadline = time.perf_counter() + DRAIN_SECONDS
        while self.sent > self.done and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        lost = self.sent - self.done
        self.sent = self.done
        await self.stop()
        return lost

    async def run(self) -> dict:
        """One throughput measurement."""
        await self.start()
        self.errors = 0
        first = self.arrivals
        self.running = True
        self.fill()
        await asyncio.sleep(self.args.warmup)
        count, start = self.arrivals, time.perf_counter()
        await asyncio.sleep(self.args.duration)
        elapsed = time.perf_counter() - start
        rate = (self.arrivals - count) / elapsed
        lost = await self.drain()
        # ``total``: every arrival of the command (warm-up and drain included), the divisor of the
        # servers' CPU time over the same command (CPU per message, bench/run.py).
        return {"rate": rate, "errors": self.errors, "undrained": lost, "total": self.arrivals - first}

    async def latency(self, rate: float) -> dict:
        """Send stamped messages at ``rate``/s for warm-up + duration; percentiles of the latter."""
        await self.start()
        self.errors = 0
        tick = 0.005
        started = time.perf_counter()
        measure_from = started + self.args.warmup
        end = measure_from + self.args.duration
        sent = 0.0
        samples: list[float] = []
        self.latencies = []
        try:
            while (now := time.perf_counter()) < end:
                if now >= measure_from and self.latencies is not samples:
                    self.latencies = samples  # only arrivals of the measuring time count
                due = (now - started) * rate
                while sent < due:
                    self.sent += self.send_one(True)
                    sent += 1
                await asyncio.sleep(tick)
            lost = await self.drain()
        finally:
            self.latencies = None
        return {**percentiles(samples), "rate": rate, "errors": self.errors, "undrained": lost}


class Inbound(Scenario):
    """Clients send; engine consumers (or, for ``echo``, the clients themselves) count."""

    def __init__(self, args: Any, echo: bool) -> None:
        super().__init__(args)
        self.echo = echo
        self.clients: list[WSTransport] = []
        self.consumers: list[WSTransport] = []
        self.next = 0

    async def setup(self) -> dict:
        if self.echo:
            self.clients, _ = await connect_many(self.args.clients, self.args.n, lambda i, f: self.arrived(f))
        else:
            for url in self.args.api:
                self.consumers.append(await connect(url, self._event))
            self.clients, _ = await connect_many(self.args.clients, self.args.n, lambda i, f: None)
        if len(self.clients) != self.args.n:
            raise SystemExit(f"only {len(self.clients)} of {self.args.n} clients connected")
        return {"clients": len(self.clients), "consumers": len(self.consumers)}

    def _event(self, frame: WSFrame) -> None:
        if bytes(frame.get_payload_as_memoryview()[:9]) == b'{"event":':
            self.arrived(frame)
        elif b'"error":{' in frame.get_payload_as_bytes():
            self.errors += 1

    async def start(self) -> None:
        for consumer in self.consumers:
            consumer.send(WSMsgType.TEXT, b'{"method":"queue.consume","params":["foo"],"id":1}')

    async def stop(self) -> None:
        for consumer in self.consumers:
            consumer.send(WSMsgType.TEXT, b'{"method":"queue.unconsume","params":[],"id":2}')
        await asyncio.sleep(0.05)

    def send_one(self, probe: bool) -> int:
        self.clients[self.next].send(WSMsgType.TEXT, stamp() if probe else PAYLOAD)
        self.next = (self.next + 1) % len(self.clients)
        return 1


class Push(Scenario):
    """One API connection asks the server to send to the clients, round robin."""

    def __init__(self, args: Any, raw: bool) -> None:
        super().__init__(args)
        self.raw = raw
        self.api: WSTransport | None = None
        self.ids: list[Any] = []
        self.requests: list[bytes] = []
        self.next = 0

    async def setup(self) -> dict:
        clients, _ = await connect_many(self.args.clients, self.args.n, lambda i, f: self.arrived(f))
        if len(clients) != self.args.n:
            raise SystemExit(f"only {len(clients)} of {self.args.n} clients connected")
        self.api = await connect(self.args.api[0], self._reply)
        if self.raw:
            self.ids = list(range(len(clients)))
        else:
            self.ids = await learn_ids(self.args.learn_api or self.args.api[0], clients)
        self.requests = [self.request(i, "x" * 32) for i in self.ids]
        await self.check()
        return {"clients": len(clients)}

    def request(self, client: Any, text: str) -> bytes:
        if self.raw:
            return json.dumps({"c": client, "d": text}).encode()
        return json.dumps({"method": "mesh.send", "params": [{"client_id": client, "data": text}], "id": 1}).encode()

    async def check(self) -> None:
        """Send one message until it arrives (the mesh link may still be coming up)."""
        deadline = time.perf_counter() + 15
        while time.perf_counter() < deadline:
            before = self.done
            self.sent += self.send_one(False)
            await asyncio.sleep(0.2)
            if self.done > before:
                self.sent = self.done
                return
        raise SystemExit("mesh.send never arrived")

    def _reply(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if payload != b"ok" and not payload.startswith(b'{"error":null'):
            self.errors += 1
            self.done += 1  # nothing will arrive for it: free its place in the window
            self.fill()

    def send_one(self, probe: bool) -> int:
        assert self.api is not None
        if probe:
            self.api.send(WSMsgType.TEXT, self.request(self.ids[self.next], stamp_text()))
        else:
            self.api.send(WSMsgType.TEXT, self.requests[self.next])
        self.next = (self.next + 1) % len(self.requests)
        return 1


async def learn_ids(api_url: str, clients: list[WSTransport]) -> list[str]:
    """The engine client id of each client: each says ``hello TOKEN INDEX``, a consumer reads them.

    The token keeps stale queue messages (other runs, other processes) out.
    """
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    pattern = re.compile(rb'"client_id":"(\d+)".*?hello ' + token.encode() + rb" (\d+)")
    ids: dict[int, str] = {}
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    def event(frame: WSFrame) -> None:
        found = pattern.search(frame.get_payload_as_bytes())
        if found:
            ids[int(found.group(2))] = found.group(1).decode()
            if len(ids) == len(clients) and not done.done():
                done.set_result(True)

    learner = await connect(api_url, event)
    learner.send(WSMsgType.TEXT, b'{"method":"queue.consume","params":["foo"],"id":0}')
    for index, client in enumerate(clients):
        client.send(WSMsgType.TEXT, f"hello {token} {index}".encode())
    await asyncio.wait_for(done, 60)
    learner.send(WSMsgType.TEXT, b'{"method":"queue.unconsume","params":[],"id":0}')
    await asyncio.sleep(0.1)
    learner.disconnect()
    return [ids[i] for i in range(len(clients))]


class Relay(Scenario):
    """Client to client through Lua: sender ``i`` sends ``"<id of receiver i> <text>"`` to its
    engine, whose entry (``bench/entry.relay.lua``) calls ``mix.mesh.send``; receivers count.

    Senders connect to ``--clients``, receivers to ``--targets``; the receivers' ids are learnt
    through queue foo of ``--learn-api`` (the receivers' engine).  An error (``err:...`` sent back
    to the sender) frees its place in the window.
    """

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.senders: list[WSTransport] = []
        self.ids: list[str] = []
        self.requests: list[bytes] = []
        self.next = 0

    async def setup(self) -> dict:
        receivers, _ = await connect_many(self.args.targets, self.args.n, lambda i, f: self.arrived(f))
        self.senders, _ = await connect_many(self.args.clients, self.args.n, lambda i, f: self._reply(f))
        if len(receivers) != self.args.n or len(self.senders) != self.args.n:
            raise SystemExit(f"only {len(receivers)} receivers and {len(self.senders)} senders connected")
        self.ids = await learn_ids(self.args.learn_api or self.args.api[0], receivers)
        self.requests = [f"{cid} {'x' * 32}".encode() for cid in self.ids]
        deadline = time.perf_counter() + 15
        while time.perf_counter() < deadline:  # the mesh link may still be coming up
            before = self.done
            self.sent += self.send_one(False)
            await asyncio.sleep(0.2)
            if self.done > before and not self.errors:
                self.sent = self.done
                return {"clients": len(receivers)}
            self.sent, self.errors = self.done, 0
        raise SystemExit("relay never arrived")

    def _reply(self, frame: WSFrame) -> None:
        if frame.get_payload_as_bytes().startswith(b"err:"):
            self.errors += 1
            self.done += 1
            self.fill()

    def send_one(self, probe: bool) -> int:
        i = self.next
        self.next = (i + 1) % len(self.senders)
        payload = f"{self.ids[i]} {stamp_text()}".encode() if probe else self.requests[i]
        self.senders[i].send(WSMsgType.TEXT, payload)
        return 1


class Subscribers:
    """Publish subscribers read in bulk, so that receiving costs the load generator next to nothing.

    Every delivery of a publish run is the same frame (a 32-byte text payload: 34 bytes), so
    the bytes a subscriber received count its deliveries.  The sockets are plain non-blocking
    sockets outside the event loop (the handshake is done by hand); ``count()`` reads every
    socket with something waiting, once, through an epoll of their own.  Read every
    ``READ_EVERY`` seconds, a socket has several frames waiting: one ``recv`` for all of them,
    and no Python per frame (picows would call back once per frame: with 10,000 subscribers the
    load generator needed half a core, which the engine then lacked on a 2-core machine).
    """

    FRAME = 2 + 32
    READ_EVERY = 0.25

    def __init__(self) -> None:
        self.sockets: dict[int, socket.socket] = {}
        self.poller = select.epoll()
        self.received = 0
        self.closed = 0
        #: The last reason a subscriber failed to connect.
        self.why = ""

    @property
    def deliveries(self) -> int:
        return self.received // self.FRAME

    async def open(self, urls: list[str], count: int, parallel: int, deadline: float) -> int:
        """Open ``count`` subscribers round robin over ``urls``; the number that failed."""
        state = {"next": 0, "failed": 0}

        async def worker() -> None:
            while state["next"] < count and time.perf_counter() < deadline:
                index = state["next"]
                state["next"] += 1
                try:
                    sock = await self._handshake(urls[index % len(urls)])
                except Exception as e:  # noqa: BLE001 (refused, reset, fd limit: each one counts)
                    state["failed"] += 1
                    self.why = f"{type(e).__name__}: {e}"
                    continue
                self.sockets[sock.fileno()] = sock
                self.poller.register(sock.fileno(), select.EPOLLIN)

        await asyncio.gather(*(worker() for _ in range(min(parallel, max(count, 1)))))
        return state["failed"]

    async def _handshake(self, url: str) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, _, port = url.removeprefix("ws://").partition("/")[0].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if SOURCE:
                sock.bind((SOURCE, 0))
            await loop.sock_connect(sock, (host, int(port)))
            key = base64.b64encode(os.urandom(16)).decode()
            request = (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n")
            await loop.sock_sendall(sock, request.encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                answer += chunk
            head, _, rest = answer.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
            self.received += len(rest)
            linger_zero(sock)
            return sock
        except BaseException:
            sock.close()
            raise

    def count(self) -> int:
        """Read what every subscriber has waiting; the deliveries so far."""
        sockets = self.sockets
        for fd, _ in self.poller.poll(0, max(len(sockets), 1)):
            sock = sockets[fd]
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self.poller.unregister(fd)
                    del sockets[fd]
                    sock.close()
                    self.closed += 1
                    break
                self.received += len(data)
                if len(data) < 1 << 16:
                    break
        return self.deliveries


class Publish(Scenario):
    """An API connection publishes to channel ``bench``; the subscribers' deliveries are counted.

    ``--pub-window`` publishes are in flight (a publish is done when its answer came back); the
    deliveries are counted at the subscribers (``Subscribers``), at the start and the end of the
    measuring time and every ``READ_EVERY`` seconds in between.
    """

    def __init__(self, args: Any, raw: bool) -> None:
        super().__init__(args)
        self.raw = raw
        self.api: WSTransport | None = None
        self.subscribers = Subscribers()
        self.published = 0
        self.reader: asyncio.Task | None = None
        if raw:
            self.request = json.dumps({"n": 1, "d": "x" * 32}).encode()
        else:
            self.request = json.dumps(
                {"method": "mesh.publish", "params": [{"channel": CHANNEL, "data": "x" * 32}], "id": 1}
            ).encode()

    async def setup(self) -> dict:
        deadline = time.perf_counter() + self.args.connect_timeout
        failed = await self.subscribers.open(self.args.clients, self.args.n, 128, deadline)
        count = len(self.subscribers.sockets)
        self.api = await connect(self.args.api[0], self._reply)
        # Sanity: one publish reaches every subscriber.
        self.send_one(False)
        end = time.perf_counter() + 30
        while self.subscribers.count() < count and time.perf_counter() < end:
            await asyncio.sleep(0.05)
        reached = self.subscribers.deliveries
        self.sent = self.done = 0
        self.window = self.args.pub_window
        self.reader = asyncio.get_running_loop().create_task(self._read())
        return {"clients": count, "failed": failed, "reached": reached, "why": self.subscribers.why}

    async def _read(self) -> None:
        while True:
            await asyncio.sleep(Subscribers.READ_EVERY)
            self.arrivals = self.subscribers.count()

    def _reply(self, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if payload != b"ok" and not payload.startswith(b'{"error":null'):
            self.errors += 1
        self.done += 1
        self.fill()

    def send_one(self, probe: bool) -> int:
        assert self.api is not None
        self.api.send(WSMsgType.TEXT, self.request)
        self.published += 1
        return 1

    async def run(self) -> dict:
        count = self.subscribers.count
        self.errors = 0
        first = count()
        published = self.published
        self.running = True
        self.fill()
        await asyncio.sleep(self.args.warmup)
        before, start = count(), time.perf_counter()
        await asyncio.sleep(self.args.duration)
        after = count()
        rate = (after - before) / (time.perf_counter() - start)
        self.running = False
        deadline = time.perf_counter() + DRAIN_SECONDS
        while self.sent > self.done and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        # Every subscriber gets every publish of the command (the sanity publish came before).
        expected = first + (self.published - published) * len(self.subscribers.sockets)
        while count() < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        lost = expected - count()
        self.sent = self.done
        return {"rate": rate, "errors": self.errors, "undrained": lost, "total": count() - first}


class Handshake(Scenario):
    """``--parallel`` workers each open a connection, reset it once open, and start again."""

    async def run(self) -> dict:
        state = {"count": 0, "failed": 0, "stop": False}

        async def worker() -> None:
            while not state["stop"]:
                try:
                    transport = await connect(self.args.clients[0], lambda f: None)
                except Exception:  # noqa: BLE001 (any failure counts as one)
                    state["failed"] += 1
                    await asyncio.sleep(0.01)
                    continue
                state["count"] += 1
                reset(transport)

        workers = [asyncio.ensure_future(worker()) for _ in range(self.args.parallel)]
        await asyncio.sleep(self.args.warmup)
        count, start = state["count"], time.perf_counter()
        await asyncio.sleep(self.args.duration)
        rate = (state["count"] - count) / (time.perf_counter() - start)
        state["stop"] = True
        await asyncio.wait(workers, timeout=DRAIN_SECONDS)
        return {"rate": rate, "errors": state["failed"]}


class Idle(Scenario):
    """Opens ``--n`` connections (``run``) and holds them until the process is told to quit."""

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.held: list[WSTransport] = []

    async def run(self) -> dict:
        start = time.perf_counter()
        clients, failed = await connect_many(
            self.args.clients, self.args.n, lambda i, f: None, parallel=self.args.parallel,
            deadline=start + self.args.connect_timeout,
        )
        self.held.extend(clients)
        await asyncio.sleep(0.5)
        alive = sum(1 for c in self.held if not c.is_disconnected)
        return {"connected": len(clients), "alive": alive, "failed": failed,
                "seconds": time.perf_counter() - start}


SCENARIOS: dict[str, Callable[[Any], Scenario]] = {
    "inbound": lambda a: Inbound(a, echo=False),
    "echo": lambda a: Inbound(a, echo=True),
    "push": lambda a: Push(a, raw=False),
    "rawpush": lambda a: Push(a, raw=True),
    "relay": Relay,
    "publish": lambda a: Publish(a, raw=False),
    "rawfanout": lambda a: Publish(a, raw=True),
    "handshake": Handshake,
    "idle": Idle,
}


def emit(value: dict) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def serve(scenario: Scenario) -> None:
    """Answer ``run`` / ``lat RATE`` commands from stdin until ``quit`` or its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            return
        if line[0] == "run":
            emit(await scenario.run())
        elif line[0] == "lat":
            emit(await scenario.latency(float(line[1])))
        else:
            emit({"error": f"unknown command {line[0]!r}"})


async def main_async(args: Any) -> None:
    global SOURCE
    SOURCE = args.source or None
    scenario = SCENARIOS[args.scenario](args)
    info = await scenario.setup()
    if args.serve:
        emit({"ready": True, **info})
        await serve(scenario)
    else:
        result = await (scenario.latency(args.rate) if args.rate else scenario.run())
        emit({**result, **info})


def parse_args(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--clients", action="append", required=True, help="client URL (repeatable)")
    parser.add_argument("--api", action="append", default=[], help="API URL (repeatable for inbound)")
    parser.add_argument("--learn-api", default="", help="push, relay: the API whose queue tells the client ids")
    parser.add_argument("--targets", action="append", default=[], help="relay: receivers' URL")
    parser.add_argument("--n", type=int, default=100, help="client connections")
    parser.add_argument("--window", type=int, default=1000, help="work in flight (publish: deliveries)")
    parser.add_argument("--pub-window", type=int, default=10, help="publish: publishes in flight")
    parser.add_argument("--parallel", type=int, default=32, help="handshake / idle: parallel connects")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=0.0, help="alone: measure latency at this rate")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--source", default="", help="local address to connect from (e.g. 127.0.0.2)")
    parser.add_argument("--serve", action="store_true", help="answer run / lat commands from stdin")
    return parser.parse_args(argv)


def main() -> None:
    uvloop.run(main_async(parse_args()))


if __name__ == "__main__":
    main()
