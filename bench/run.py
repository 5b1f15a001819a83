"""The benchmark suite of issue 6: one command, one table, each row against a baseline of the same run.

    python bench/run.py            # a few minutes, the figures of docs/performance.md
    python bench/run.py --quick    # about 1.5 minutes (2 rounds, 2,000 subscribers, 2,000 conns)
    python bench/run.py --smoke    # seconds, tiny numbers: only checks that every row yields one
    python bench/run.py --profile  # also py-spy on the engine during the first "ours" run of a row

Every server (engines, center, raw Autobahn baselines) and every load generator
(``bench/loadgen.py``, picows on uvloop) is a process of its own on 127.0.0.1 ports that were free.
Ours and the baseline are measured alternately (A B A B ...) against servers that stay up, and each
row reports the median.  Every process started here is stopped by its pid at the end, also on
errors and Ctrl-C.  The table is printed and written to ``reports/bench/`` (JSON and Markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from connmix_tx.testing import free_ports

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DEFAULT_ENTRY = str(REPO / "lua" / "entry.websocket.lua")
PUBLISH_ENTRY = str(BENCH / "entry.publish.lua")
RELAY_ENTRY = str(BENCH / "entry.relay.lua")
ECHO_ENTRY = str(BENCH / "entry.echo.lua")
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: readTimeout of the bench engines: clients that only receive (push, publish, idle) send nothing
#: for minutes; the idle wheel still watches every connection, it just never fires.
READ_TIMEOUT = 900
#: Idle connections one load generator holds (each process may open 20,000 files).
PER_IDLE_PROCESS = 9500


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes of one kind of run."""

    name: str
    rounds: int = 3
    warmup: float = 1.0
    duration: float = 3.0
    clients: int = 100
    window: int = 1000
    subscribers: int = 10_000
    idle: int = 5000
    memory_rounds: int = 2
    max_connections: int = 19_000
    latency_rate: float = 1000.0
    latency_rounds: int = 3
    handshake_parallel: int = 32
    budget: float = 900.0


FULL = Settings("default")
QUICK = Settings("quick", rounds=2, warmup=0.5, duration=1.0, subscribers=2000, idle=1000,
                 memory_rounds=1, max_connections=2000, latency_rounds=1, budget=300.0)
SMOKE = Settings("smoke", rounds=1, warmup=0.1, duration=0.3, clients=4, window=20, subscribers=20,
                 idle=20, memory_rounds=1, max_connections=40, latency_rate=100.0, latency_rounds=1,
                 handshake_parallel=2, budget=240.0)


class BenchError(Exception):
    """A process did not start, answer or connect as it should."""




def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{proc.name}: port {port} not listening after {timeout} s")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (a supervisor and its workers), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid, *children]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


class Proc:
    """A process this run started; output to a log file, stopped by its pid."""

    def __init__(self, name: str, args: list[str], logs: Path, cwd: Path, pipes: bool = False) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (open as long as the process runs)
        self.popen = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE if pipes else self._log, stderr=self._log,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._log.close()


class Driver(Proc):
    """A ``loadgen.py --serve`` process: answers one JSON line per command."""

    def __init__(self, name: str, args: list[str], logs: Path, cwd: Path) -> None:
        super().__init__(name, [sys.executable, str(BENCH / "loadgen.py"), *args, "--serve"], logs, cwd, True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.info: dict = {}

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def answer(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.name}: no answer within {timeout:.0f} s; see {self.log_path}") from None
        if line is None:
            raise BenchError(f"{self.name} exited; see {self.log_path}")
        return json.loads(line)

    def ready(self, timeout: float = 120.0) -> dict:
        self.info = self.answer(timeout)
        return self.info

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None and self.popen.stdin is not None:
            try:
                self.popen.stdin.close()  # end of input: the driver quits by itself
                self.popen.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop()


@dataclasses.dataclass
class Row:
    """One line of the table: our figure against the baseline of the same run."""

    key: str
    path: str
    unit: str
    baseline_name: str
    target: float
    higher_is_better: bool = True
    absolute_min: float | None = None
    ours: list[float] = dataclasses.field(default_factory=list)
    base: list[float] = dataclasses.field(default_factory=list)
    ours_cpu: list[float] = dataclasses.field(default_factory=list)
    base_cpu: list[float] = dataclasses.field(default_factory=list)
    ours_loadgen_cpu: list[float] = dataclasses.field(default_factory=list)
    base_loadgen_cpu: list[float] = dataclasses.field(default_factory=list)
    #: Server CPU seconds per message (all server processes of the measurement; see ``measure``).
    ours_cpm: list[float] = dataclasses.field(default_factory=list)
    base_cpm: list[float] = dataclasses.field(default_factory=list)
    #: When set: also a ceiling on the ratio of CPU per message (ours / baseline).
    cpm_target: float | None = None
    note: str = ""

    def add(self, ours: dict | None, base: dict | None) -> None:
        """One round: the answers of the two measurements (either may be absent)."""
        for answer, values, cpu, loadgen, cpm in (
            (ours, self.ours, self.ours_cpu, self.ours_loadgen_cpu, self.ours_cpm),
            (base, self.base, self.base_cpu, self.base_loadgen_cpu, self.base_cpm),
        ):
            if answer is not None:
                values.append(answer["rate"])
                if "cpu" in answer:
                    cpu.append(answer["cpu"])
                    loadgen.append(answer["loadgen_cpu"])
                if answer.get("cpu_per_msg"):
                    cpm.append(answer["cpu_per_msg"])

    def summary(self) -> dict:
        ours = statistics.median(self.ours) if self.ours else None
        base = statistics.median(self.base) if self.base else None
        ratio = ours / base if ours is not None and base else None
        # The same ratio per CPU-second the server(s) used: what the run tells about cost when the
        # servers did not get a whole core each (a shared machine, or the load generator's share).
        per_cpu = None
        if self.ours_cpu and self.base_cpu and all(self.ours_cpu) and all(self.base_cpu):
            ours_eff = statistics.median(r / c for r, c in zip(self.ours, self.ours_cpu))
            base_eff = statistics.median(r / c for r, c in zip(self.base, self.base_cpu))
            per_cpu = ours_eff / base_eff if self.higher_is_better else None
        # CPU per message, ours over the baseline, median of the rounds' own ratios (a round's two
        # measurements are seconds apart, so they share the neighbours' load best).
        cpm_ratio = None
        if self.ours_cpm and len(self.ours_cpm) == len(self.base_cpm):
            cpm_ratio = statistics.median(o / b for o, b in zip(self.ours_cpm, self.base_cpm))
        if ratio is None:
            verdict = "n/a"
        else:
            ok = ratio >= self.target if self.higher_is_better else ratio <= self.target
            if self.absolute_min is not None:
                ok = ok and ours >= self.absolute_min
            if self.cpm_target is not None:
                ok = ok and cpm_ratio is not None and cpm_ratio <= self.cpm_target
            verdict = "PASS" if ok else "MISS"
        target = ("≥ " if self.higher_is_better else "≤ ") + f"{self.target:g}"
        if self.absolute_min is not None:
            target += f", ≥ {self.absolute_min:,.0f}"
        if self.cpm_target is not None:
            target += f"; CPU/msg ≤ {self.cpm_target:g}×"
        return {
            "key": self.key, "path": self.path, "unit": self.unit, "baseline": self.baseline_name,
            "ours": ours, "base": base, "ratio": ratio, "target": target, "verdict": verdict,
            "ours_samples": self.ours, "base_samples": self.base,
            "ours_cpu": _median(self.ours_cpu), "base_cpu": _median(self.base_cpu),
            "ours_loadgen_cpu": _median(self.ours_loadgen_cpu), "base_loadgen_cpu": _median(self.base_loadgen_cpu),
            "ratio_per_server_cpu": per_cpu, "note": self.note,
            "ours_cpu_per_msg_us": None if not self.ours_cpm else 1e6 * statistics.median(self.ours_cpm),
            "base_cpu_per_msg_us": None if not self.base_cpm else 1e6 * statistics.median(self.base_cpm),
            "cpu_per_msg_ratio": cpm_ratio,
            "ours_cpm_samples": [1e6 * v for v in self.ours_cpm], "base_cpm_samples": [1e6 * v for v in self.base_cpm],
        }


def mesh_sent(api_port: int) -> tuple[float, float]:
    """(operations, batches) an engine sent over the mesh so far, from its ``GET /metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    ops = batches = 0.0
    for line in text.splitlines():
        if 'direction="out"' not in line:
            continue
        if line.startswith("connmix_engine_mesh_messages_total{"):
            ops += float(line.rsplit(" ", 1)[1])
        elif line.startswith("connmix_engine_mesh_batches_total{"):
            batches += float(line.rsplit(" ", 1)[1])
    return ops, batches


def _us(answer: dict) -> str:
    """CPU per message of one measurement, for the progress lines."""
    value = answer.get("cpu_per_msg")
    return "- µs/msg" if value is None else f"{1e6 * value:.1f} µs/msg"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Bench:
    """Starts the servers and drivers of each phase, measures, keeps the results."""

    def __init__(self, settings: Settings, out: Path, profile: bool) -> None:
        self.s = settings
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="connmix-bench-"))
        self.procs: list[Proc] = []
        self.profile = profile
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.deadline = time.monotonic() + settings.budget
        self.rows: dict[str, Row] = {
            "inbound": Row("inbound", "client → Lua on_message → queue → API consumer", "msg/s",
                           "raw Autobahn echo", 0.5),
            "send": Row("send", "API mesh.send → client", "msg/s", "raw Autobahn push", 0.6),
            "publish": Row("publish", f"mesh.publish to {settings.subscribers:,} subscribers", "deliveries/s",
                           "raw prepared-frame fan-out", 0.8),
            "cross": Row("cross", "cross-engine API mesh.send (2 engines + center)", "msg/s",
                         "local mesh.send, same run", 0.9, cpm_target=1.5),
            "lua": Row("lua", "cross-engine Lua mix.mesh.send client → client", "msg/s",
                       "the same on one engine, same run", 0.9, cpm_target=1.5),
            "memory": Row("memory", f"idle connections, default entry ({settings.idle:,})", "bytes/conn",
                          "raw Autobahn idle", 1.3, higher_is_better=False),
            "handshake": Row("handshake", "WebSocket handshakes with Lua on_handshake", "handshakes/s",
                             "raw Autobahn handshakes", 0.7),
            "scale": Row("scale", "2 engine processes vs 1 (inbound)", "msg/s",
                         "1 engine, same run", 1.7),
            "queue_redis": Row("queue_redis", "client → Lua → queue → API consumer, redis backend", "msg/s",
                               "memory backend, same run", 0.5),
            "w_echo": Row("w_echo", f"Lua echo, {settings.clients} clients, 2 workers", "msg/s",
                          "1 worker, same run", 1.5),
            "w_publish": Row("w_publish", f"mesh.publish to {settings.subscribers:,} subscribers, 2 workers",
                             "deliveries/s", "1 worker, same run", 1.5),
            "w_inbound": Row("w_inbound", "client → Lua → queue → one API consumer, 2 workers", "msg/s",
                             "1 worker, same run", 1.3),
            "w_conns": Row("w_conns", "idle connections held by one engine, 2 workers", "connections",
                           "2 × 1 worker, same run", 0.95),
        }
        self.latency: dict[str, dict[str, list[float]]] = {}
        self.max_connections: dict[str, Any] = {}
        self.profiles: dict[str, str] = {}
        #: The answer of the last "ours" measurement of ``pair``.
        self.ours_answer: dict = {}
        #: Failed requests (error replies, failed connects) per load generator.
        self.errors: dict[str, int] = {}
        self.started = time.time()

    # Processes -------------------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.logs, self.work)
        self.procs.append(proc)
        return proc

    def driver(self, name: str, *args: str) -> Driver:
        proc = Driver(name, [*args, "--warmup", str(self.s.warmup), "--duration", str(self.s.duration)],
                      self.logs, self.work)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc]) -> None:
        """Drivers first (they close their connections), then the servers."""
        for proc in sorted(procs, key=lambda p: not isinstance(p, Driver)):
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(self.procs))
        shutil.rmtree(self.work, ignore_errors=True)

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise BenchError(f"over the time budget of {self.s.budget:.0f} s")

    def raw(self, name: str, mode: str) -> tuple[Proc, int]:
        (port,) = free_ports(1)
        return self.start(name, [sys.executable, str(BENCH / "raw_server.py"), mode, str(port)]), port

    def engine(self, name: str, role: str, servers: list[tuple[int, str]], center: dict[str, int],
               ports: dict[str, int], read_timeout: int = READ_TIMEOUT, luavm: dict | None = None,
               processes: int = 1) -> Proc:
        """A ``twistd connmix`` process (``role`` dev or engine) with its YAML in the work folder."""
        config: dict[str, Any] = {
            "logging": {"level": "warn"},
            "engine": {
                "centerRegistry": f"127.0.0.1:{center['registry']}",
                "meshPoint": {"bind": "127.0.0.1", "port": ports["mesh"]},
                "apiServer": {"bind": "127.0.0.1", "port": ports["api"]},
                "servers": [
                    {"protocol": "websocket", "bind": "127.0.0.1", "port": port, "entry": entry,
                     "readTimeout": read_timeout}
                    for port, entry in servers
                ],
            },
        }
        if luavm:
            config["engine"]["luavm"] = luavm
        if role == "dev":
            config["center"] = {"registry": {"bind": "127.0.0.1", "port": center["registry"]},
                                "apiServer": {"bind": "127.0.0.1", "port": center["api"]}}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        flag = ["--dev"] if role == "dev" else ["--role", role]
        if processes != 1:
            flag += ["-p", str(processes)]
        return self.start(name, [*TWISTD, "-n", "--pidfile=", "connmix", *flag, "-f", str(path)])

    def center(self, name: str) -> tuple[Proc, dict[str, int]]:
        registry, api = free_ports(2)
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "logging": {"level": "warn"},
            "center": {"registry": {"bind": "127.0.0.1", "port": registry},
                       "apiServer": {"bind": "127.0.0.1", "port": api}},
        }))
        proc = self.start(name, [*TWISTD, "-n", "--pidfile=", "connmix", "--role", "center", "-f", str(path)])
        return proc, {"registry": registry, "api": api}

    def dev_engine(self, name: str, entry: str, read_timeout: int = READ_TIMEOUT,
                   luavm: dict | None = None) -> tuple[Proc, dict[str, int]]:
        registry, capi, mesh, api, client = free_ports(5)
        ports = {"mesh": mesh, "api": api, "client": client}
        proc = self.engine(name, "dev", [(client, entry)], {"registry": registry, "api": capi}, ports,
                           read_timeout, luavm)
        return proc, ports

    # Measuring -------------------------------------------------------------------------------

    def measure(self, driver: Driver, command: str, pids: list[int], profile: str | None = None) -> dict:
        """Send one command; the answer with the CPU share of ``pids`` (cores) while it ran."""
        self.check_time()
        spy = self._spy(profile, pids) if profile else []
        before = [cpu_ticks(p) for p in pids]
        loadgen = cpu_ticks(driver.pid)
        start = time.monotonic()
        driver.send(command)
        answer = driver.answer(timeout=self.s.warmup + self.s.duration + 60)
        elapsed = time.monotonic() - start
        each = [(cpu_ticks(p) - b) / CLK_TCK for p, b in zip(pids, before)]
        cpu_seconds = sum(each)
        answer["cpu"] = cpu_seconds / elapsed
        answer["cpu_each"] = [seconds / elapsed for seconds in each]  # cores, in the order of pids
        if answer.get("total"):
            # Every server process of the measurement, over every message of the command.
            answer["cpu_per_msg"] = cpu_seconds / answer["total"]
        answer["loadgen_cpu"] = (cpu_ticks(driver.pid) - loadgen) / CLK_TCK / elapsed
        for proc in spy:
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.stop([proc])
        if "error" in answer:
            raise BenchError(f"{driver.name}: {answer['error']}")
        if answer.get("errors"):
            self.errors[driver.name] = self.errors.get(driver.name, 0) + answer["errors"]
        return answer

    def _spy(self, row: str, pids: list[int]) -> list[Proc]:
        """py-spy on each pid for the measurement (warm-up excluded only roughly)."""
        procs = []
        seconds = max(1, int(self.s.warmup + self.s.duration))
        names = {proc.pid: proc.name for proc in self.procs}
        for pid in pids:
            label = f"{row}-{names.get(pid, pid)}"
            output = self.out / f"profile-{label}.txt"
            procs.append(self.start(f"py-spy-{label}", [
                self.py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
                "--format", "raw", "--nonblocking", "--output", str(output),
            ]))
            self.profiles[label] = str(output)
        time.sleep(0.3)  # py-spy attaches
        return procs

    def pair(self, row: Row, ours: tuple[Driver, list[int]], base: tuple[Driver, list[int]],
             round_no: int, command: str = "run") -> None:
        """Baseline then ours (A B), one round of a row."""
        b = self.measure(base[0], command, base[1])
        o = self.measure(ours[0], command, ours[1])
        self.ours_answer = o
        row.add(o, b)
        self.say(f"  {row.key:9} round {round_no + 1}: ours {o['rate']:,.0f} (cpu {o['cpu']:.2f}, "
                 f"{_us(o)}, loadgen {o['loadgen_cpu']:.2f}, errors {o.get('errors', 0)}), "
                 f"baseline {b['rate']:,.0f} (cpu {b['cpu']:.2f}, {_us(b)}, loadgen {b['loadgen_cpu']:.2f})")

    def profile_runs(self, runs: list[tuple[str, Driver, list[int]]]) -> None:
        """With ``--profile``: one more, uncounted run of each under py-spy."""
        if self.profile:
            for row, driver, pids in runs:
                answer = self.measure(driver, "run", pids, profile=row)
                self.say(f"  profiled  {row}: {answer['rate']:,.0f} under py-spy")

    @staticmethod
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # Phases ----------------------------------------------------------------------------------

    def phase_cluster(self) -> None:
        """Inbound, 2 vs 1, mesh.send local and across engines, handshakes, latency."""
        s = self.s
        center, cports = self.center("center")
        wait_port(cports["api"], center)
        engines = {}
        for name in ("engine-a", "engine-b"):
            mesh, api, client = free_ports(3)
            ports = {"mesh": mesh, "api": api, "client": client}
            engines[name] = (self.engine(name, "engine", [(client, DEFAULT_ENTRY)], cports, ports), ports)
        echo, echo_port = self.raw("raw-echo", "echo")
        push, push_port = self.raw("raw-push", "push")
        for proc, ports in engines.values():
            wait_port(ports["client"], proc)
            wait_port(ports["api"], proc)
        wait_port(echo_port, echo)
        wait_port(push_port, push)
        self.wait_nodes(cports["api"], 2)
        (a, pa), (b, pb) = engines["engine-a"], engines["engine-b"]
        ca, cb = f"ws://127.0.0.1:{pa['client']}", f"ws://127.0.0.1:{pb['client']}"
        apia, apib = f"ws://127.0.0.1:{pa['api']}/ws/v1", f"ws://127.0.0.1:{pb['api']}/ws/v1"
        raw_echo, raw_push = f"ws://127.0.0.1:{echo_port}", f"ws://127.0.0.1:{push_port}"
        common = ["--n", str(s.clients), "--window", str(s.window)]

        drivers: dict[str, Driver] = {}
        specs = {
            "echo": ["echo", "--clients", raw_echo, *common],
            "in1": ["inbound", "--clients", ca, "--api", apia, *common],
            "in2": ["inbound", "--clients", ca, "--clients", cb, "--api", apia, "--api", apib, *common],
            "rawpush": ["rawpush", "--clients", raw_push, "--api", f"{raw_push}/ctl", *common],
            "local": ["push", "--clients", cb, "--api", apib, *common],
            "cross": ["push", "--clients", cb, "--api", apia, "--learn-api", apib, *common],
            "hs-raw": ["handshake", "--clients", raw_echo, "--parallel", str(s.handshake_parallel)],
            "hs-ours": ["handshake", "--clients", ca, "--parallel", str(s.handshake_parallel)],
        }
        # One at a time: the push drivers learn client ids through queue foo, which must have no
        # other consumer meanwhile.
        for name, args in specs.items():
            drivers[name] = self.driver(f"loadgen-{name}", *args)
            drivers[name].ready()
        rows = self.rows
        for r in range(s.rounds):
            self.check_time()
            self.pair(rows["inbound"], (drivers["in1"], [a.pid]), (drivers["echo"], [echo.pid]), r)
            o = self.measure(drivers["in2"], "run", [a.pid, b.pid])
            rows["scale"].add(o, self.last_ours(rows["inbound"]))
            self.say(f"  scale     round {r + 1}: 2 engines {o['rate']:,.0f} (cpu {o['cpu']:.2f}, "
                     f"loadgen {o['loadgen_cpu']:.2f})")
            self.pair(rows["send"], (drivers["local"], [b.pid]), (drivers["rawpush"], [push.pid]), r)
            o = self.measure(drivers["cross"], "run", [a.pid, b.pid])
            rows["cross"].add(o, self.last_ours(rows["send"]))
            self.say(f"  cross     round {r + 1}: {o['rate']:,.0f} (cpu {o['cpu']:.2f}, {_us(o)}, "
                     f"loadgen {o['loadgen_cpu']:.2f}, errors {o['errors']})")
            self.pair(rows["handshake"], (drivers["hs-ours"], [a.pid]), (drivers["hs-raw"], [echo.pid]), r)
        self.profile_runs([("inbound", drivers["in1"], [a.pid]), ("scale", drivers["in2"], [a.pid, b.pid]),
                           ("send", drivers["local"], [b.pid]), ("cross", drivers["cross"], [a.pid, b.pid]),
                           ("handshake", drivers["hs-ours"], [a.pid])])
        rate = s.latency_rate
        for r in range(s.latency_rounds):
            for key, name, pids in (("inbound raw echo", "echo", [echo.pid]), ("inbound", "in1", [a.pid]),
                                    ("mesh.send raw push", "rawpush", [push.pid]), ("mesh.send", "local", [b.pid])):
                answer = self.measure(drivers[name], f"lat {rate:g}", pids)
                entry = self.latency.setdefault(key, {"p50_ms": [], "p99_ms": [], "samples": []})
                for field in entry:
                    if answer.get(field) is not None:
                        entry[field].append(answer[field])
            self.say(f"  latency   round {r + 1} at {rate:g}/s: " + ", ".join(
                f"{k} p50 {v['p50_ms'][-1]:.2f} p99 {v['p99_ms'][-1]:.2f} ms"
                for k, v in self.latency.items() if v["p50_ms"]))
        self.stop(list(self.procs))

    @staticmethod
    def last_ours(row: Row) -> dict:
        """The latest "ours" measurement of ``row``, as an answer (the baseline of another row)."""
        answer = {"rate": row.ours[-1], "cpu": row.ours_cpu[-1], "loadgen_cpu": row.ours_loadgen_cpu[-1]}
        if row.ours_cpm and len(row.ours_cpm) == len(row.ours):
            answer["cpu_per_msg"] = row.ours_cpm[-1]
        return answer

    def phase_mesh(self) -> None:
        """Forwarded against local, API and Lua: CPU per message of every engine involved.

        Center + engines A and B, each with a default server and a relay server
        (``bench/entry.relay.lua``).  API: the connection on B (local) or on A (forwarded), the
        clients on B.  Lua: receivers on B, senders on B (local) or on A (forwarded).  Local is
        measured with both engines' CPU as well (A is idle then), so the two figures compare.
        """
        s = self.s
        center, cports = self.center("center-mesh")
        wait_port(cports["api"], center)
        engines = {}
        for name in ("engine-ma", "engine-mb"):
            mesh, api, client, relay = free_ports(4)
            ports = {"mesh": mesh, "api": api, "client": client, "relay": relay}
            servers = [(client, DEFAULT_ENTRY), (relay, RELAY_ENTRY)]
            engines[name] = (self.engine(name, "engine", servers, cports, ports), ports)
        for proc, ports in engines.values():
            wait_port(ports["relay"], proc)
            wait_port(ports["api"], proc)
        self.wait_nodes(cports["api"], 2)
        (a, pa), (b, pb) = engines["engine-ma"], engines["engine-mb"]
        url = "ws://127.0.0.1:{}".format
        apia, apib = f"{url(pa['api'])}/ws/v1", f"{url(pb['api'])}/ws/v1"
        common = ["--n", str(s.clients), "--window", str(s.window)]
        specs = {
            "local": ["push", "--clients", url(pb["client"]), "--api", apib, *common],
            "cross": ["push", "--clients", url(pb["client"]), "--api", apia, "--learn-api", apib, *common],
            "lua-local": ["relay", "--clients", url(pb["relay"]), "--targets", url(pb["relay"]),
                          "--learn-api", apib, *common],
            "lua-cross": ["relay", "--clients", url(pa["relay"]), "--targets", url(pb["relay"]),
                          "--learn-api", apib, *common],
        }
        drivers: dict[str, Driver] = {}
        for name, args in specs.items():  # one at a time: ids are learnt through queue foo
            drivers[name] = self.driver(f"loadgen-m{name}", *args)
            drivers[name].ready()
        both = [a.pid, b.pid]
        sent = {"cross": [0.0, 0.0], "lua": [0.0, 0.0]}  # ops, batches engine A sent over the mesh
        cores: dict[str, list[list[float]]] = {"cross": [], "lua": []}  # [A, B] cores of each forwarded run
        for r in range(s.rounds):
            self.check_time()
            for key, ours, base in (("cross", "cross", "local"), ("lua", "lua-cross", "lua-local")):
                before = mesh_sent(pa["api"])
                self.pair(self.rows[key], (drivers[ours], both), (drivers[base], both), r)
                after = mesh_sent(pa["api"])
                sent[key] = [total + a - b for total, a, b in zip(sent[key], after, before)]
                cores[key].append(self.ours_answer.get("cpu_each", [0.0, 0.0]))
        for key, (ops, batches) in sent.items():
            if batches:
                a_cores = statistics.median(c[0] for c in cores[key])
                b_cores = statistics.median(c[1] for c in cores[key])
                self.rows[key].note = (f"engine A sent {ops:,.0f} mesh ops in {batches:,.0f} batches "
                                       f"({ops / batches:.1f} per batch); forwarded, engine A used "
                                       f"{a_cores:.2f} core and engine B {b_cores:.2f} (medians)")
        self.profile_runs([("mesh-cross", drivers["cross"], both), ("mesh-local", drivers["local"], both),
                           ("lua-cross", drivers["lua-cross"], both), ("lua-local", drivers["lua-local"], both)])
        self.stop(list(self.procs))

    def wait_nodes(self, api_port: int, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        nodes: list = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/nodes", timeout=2) as response:
                    nodes = json.loads(response.read())["nodes"]
                if len(nodes) == count:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise BenchError(f"the center lists {len(nodes)} engines, expected {count}")

    def phase_publish(self) -> None:
        s = self.s
        engine, ports = self.dev_engine("engine-publish", PUBLISH_ENTRY)
        fanout, fanout_port = self.raw("raw-fanout", "fanout")
        wait_port(ports["client"], engine)
        wait_port(ports["api"], engine)
        wait_port(fanout_port, fanout)
        raw_url = f"ws://127.0.0.1:{fanout_port}"
        common = ["--n", str(s.subscribers), "--connect-timeout", "120"]
        base = self.driver("loadgen-rawfanout", "rawfanout", "--clients", raw_url, "--api", f"{raw_url}/ctl", *common)
        base.ready(timeout=180)
        ours = self.driver("loadgen-publish", "publish", "--clients", f"ws://127.0.0.1:{ports['client']}",
                           "--api", f"ws://127.0.0.1:{ports['api']}/ws/v1", *common)
        ours.ready(timeout=180)
        for driver in (base, ours):
            if driver.info["reached"] != s.subscribers:
                raise BenchError(f"{driver.name}: {driver.info}")
        for r in range(s.rounds):
            self.pair(self.rows["publish"], (ours, [engine.pid]), (base, [fanout.pid]), r)
        self.profile_runs([("publish", ours, [engine.pid])])
        self.stop(list(self.procs))

    def phase_queue(self) -> None:
        """Inbound on the redis queue backend against the memory backend, with engine (and Redis)
        CPU per message."""
        s = self.s
        binary = shutil.which("redis-server")
        if binary is None:
            self.say("  queue: redis-server is not installed; row skipped")
            return
        (redis_port,) = free_ports(1)
        redis = self.start("redis-server", [binary, "--port", str(redis_port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no"])
        wait_port(redis_port, redis)
        luavm = {"queue": {"backend": "redis"}, "redis": [{"name": "default", "addr": f"127.0.0.1:{redis_port}"}]}
        memory, pm = self.dev_engine("engine-memory", DEFAULT_ENTRY)
        durable, pr = self.dev_engine("engine-redis", DEFAULT_ENTRY, luavm=luavm)
        for proc, ports in ((memory, pm), (durable, pr)):
            wait_port(ports["client"], proc)
            wait_port(ports["api"], proc)
        common = ["--n", str(s.clients), "--window", str(s.window)]
        drivers = {}
        for name, ports in (("memory", pm), ("redis", pr)):
            drivers[name] = self.driver(f"loadgen-queue-{name}", "inbound", "--clients",
                                        f"ws://127.0.0.1:{ports['client']}", "--api",
                                        f"ws://127.0.0.1:{ports['api']}/ws/v1", *common)
            drivers[name].ready()
        row = self.rows["queue_redis"]
        redis_cpu: list[float] = []
        for r in range(s.rounds):
            self.check_time()
            ticks = cpu_ticks(redis.pid)
            self.pair(row, (drivers["redis"], [durable.pid]), (drivers["memory"], [memory.pid]), r)
            # Redis worked during the redis run only (the memory run does not touch it).
            redis_cpu.append((cpu_ticks(redis.pid) - ticks) / CLK_TCK)
            o, b = row.ours[-1], row.base[-1]
            self.say(f"  queue     round {r + 1}: engine CPU per message: redis "
                     f"{row.ours_cpu[-1] / o * 1e6:.1f} µs, memory {row.base_cpu[-1] / b * 1e6:.1f} µs")
        self.profile_runs([("queue_redis", drivers["redis"], [durable.pid])])
        if row.ours and row.base:
            per = statistics.median(c / r * 1e6 for c, r in zip(row.ours_cpu, row.ours))
            base = statistics.median(c / r * 1e6 for c, r in zip(row.base_cpu, row.base))
            seconds = s.warmup + s.duration
            redis_per = statistics.median(c / (r * seconds) * 1e6 for c, r in zip(redis_cpu, row.ours))
            row.note = (f"engine CPU per message: redis backend {per:.1f} µs, memory backend {base:.1f} µs; "
                        f"redis-server about {redis_per:.1f} µs per message")
        self.stop(list(self.procs))

    def phase_workers(self) -> None:
        """One engine with 2 worker processes against the same engine in one process (docs/workers.md).

        Each engine has three protocol servers on shared ports: a Lua echo, the default entry
        (queue foo) and the publish entry (channel ``bench``).  The CPU of every process of an
        engine (supervisor and workers) counts.
        """
        s = self.s
        engines: dict[str, tuple[Proc, dict[str, int]]] = {}
        for name, processes in (("engine-w2", 2), ("engine-w1", 1)):
            registry, capi, api, echo, default, publish = free_ports(6)
            ports = {"mesh": free_ports(consecutive=True, count=processes)[0], "api": api, "echo": echo,
                     "client": default, "publish": publish, "center_api": capi}
            servers = [(echo, ECHO_ENTRY), (default, DEFAULT_ENTRY), (publish, PUBLISH_ENTRY)]
            proc = self.engine(name, "dev", servers, {"registry": registry, "api": capi}, ports,
                               processes=processes)
            engines[name] = (proc, ports)
        for name, (proc, ports) in engines.items():
            wait_port(ports["api"], proc)
            wait_port(ports["publish"], proc)
            self.wait_nodes(ports["center_api"], 2 if name == "engine-w2" else 1)
        time.sleep(1.0)  # the workers' mesh links come up with the next node list push
        pids = {name: family(proc.pid) for name, (proc, _) in engines.items()}
        if len(pids["engine-w2"]) != 3:
            raise BenchError(f"engine-w2: expected a supervisor and 2 workers, found pids {pids['engine-w2']}")
        url = "ws://127.0.0.1:{}".format
        common = ["--n", str(s.clients), "--window", str(s.window)]
        drivers: dict[str, Driver] = {}
        for key, ports in (("2", engines["engine-w2"][1]), ("1", engines["engine-w1"][1])):
            drivers[f"echo{key}"] = self.driver(f"loadgen-w{key}-echo", "echo", "--clients", url(ports["echo"]), *common)
            drivers[f"in{key}"] = self.driver(f"loadgen-w{key}-inbound", "inbound", "--clients", url(ports["client"]),
                                              "--api", f"{url(ports['api'])}/ws/v1", *common)
            drivers[f"pub{key}"] = self.driver(
                f"loadgen-w{key}-publish", "publish", "--clients", url(ports["publish"]),
                "--api", f"{url(ports['api'])}/ws/v1", "--n", str(s.subscribers), "--connect-timeout", "120")
        for name, driver in drivers.items():
            driver.ready(timeout=180)
            if name.startswith("pub") and driver.info["reached"] != s.subscribers:
                raise BenchError(f"{driver.name}: {driver.info}")
        two, one = pids["engine-w2"], pids["engine-w1"]
        for r in range(s.rounds):
            self.check_time()
            for row, name in (("w_echo", "echo"), ("w_inbound", "in"), ("w_publish", "pub")):
                self.pair(self.rows[row], (drivers[f"{name}2"], two), (drivers[f"{name}1"], one), r)
        self.profile_runs([("w_echo", drivers["echo2"], two), ("w_inbound", drivers["in2"], two),
                           ("w_publish", drivers["pub2"], two), ("w_publish1", drivers["pub1"], one)])
        self.stop(list(drivers.values()))
        # Connections: 2 workers hold twice what one process holds (the same per-process bound).
        row = self.rows["w_conns"]
        held = {}
        for name, count in (("engine-w1", s.max_connections), ("engine-w2", 2 * s.max_connections)):
            proc, ports = engines[name]
            processes = math.ceil(count / PER_IDLE_PROCESS)
            # Each load generator connects from its own 127.0.0.x: one source address has only
            # about 28,000 ephemeral ports towards one destination port.
            idle = [self.driver(f"loadgen-{name}-idle-{i}", "idle", "--clients", url(ports["client"]),
                                "--n", str(math.ceil(count / processes)), "--parallel", "64",
                                "--connect-timeout", "150", "--source", f"127.0.0.{i + 2}")
                    for i in range(processes)]
            for driver in idle:
                driver.ready()
            start = time.monotonic()
            for driver in idle:
                driver.send("run")
            answers = [d.answer(timeout=200) for d in idle]
            held[name] = sum(a["alive"] for a in answers)
            alive = proc.popen.poll() is None
            self.say(f"  w_conns   {name}: {held[name]:,} of {count:,} held "
                     f"({sum(a['failed'] for a in answers)} failed, {time.monotonic() - start:.0f} s), "
                     f"engine {'alive' if alive else 'DEAD'}, "
                     f"RSS {sum(rss_kib(p) for p in family(proc.pid)) / 1024:.0f} MiB")
            self.stop(idle)
        row.add({"rate": float(held["engine-w2"])}, {"rate": float(2 * held["engine-w1"])})
        at_bound = held["engine-w1"] >= s.max_connections and held["engine-w2"] >= 2 * s.max_connections
        bound = " (both at the bound of this run)" if at_bound else ""
        row.note = (f"1 worker held {held['engine-w1']:,} of {s.max_connections:,}, 2 workers "
                    f"{held['engine-w2']:,} of {2 * s.max_connections:,}{bound}")
        self.stop(list(self.procs))

    def idle_rss(self, name: str, server: Proc, url: str, count: int) -> dict:
        """RSS before and after ``count`` idle connections (held until the driver stops)."""
        time.sleep(0.5)
        before = rss_kib(server.pid)
        driver = self.driver(f"loadgen-{name}", "idle", "--clients", url, "--n", str(count), "--parallel", "32")
        driver.ready()
        held = self.measure(driver, "run", [server.pid])
        time.sleep(1.0)
        after = rss_kib(server.pid)
        self.stop([driver])
        connected = held["alive"]
        return {"before_kib": before, "after_kib": after, "connections": connected,
                "bytes_per_conn": (after - before) * 1024 / max(connected, 1)}

    def phase_memory(self) -> None:
        s = self.s
        row = self.rows["memory"]
        for r in range(s.memory_rounds):
            raw, raw_port = self.raw(f"raw-idle-{r}", "echo")
            engine, ports = self.dev_engine(f"engine-idle-{r}", DEFAULT_ENTRY, )
            wait_port(raw_port, raw)
            wait_port(ports["client"], engine)
            b = self.idle_rss(f"idle-raw-{r}", raw, f"ws://127.0.0.1:{raw_port}", s.idle)
            o = self.idle_rss(f"idle-ours-{r}", engine, f"ws://127.0.0.1:{ports['client']}", s.idle)
            row.add({"rate": o["bytes_per_conn"]}, {"rate": b["bytes_per_conn"]})
            row.note = (f"RSS delta / connections; last round: ours {o['before_kib'] // 1024}→"
                        f"{o['after_kib'] // 1024} MiB, raw {b['before_kib'] // 1024}→{b['after_kib'] // 1024} MiB")
            self.say(f"  memory    round {r + 1}: ours {o['bytes_per_conn']:,.0f} B/conn ({o['connections']} conns), "
                     f"raw {b['bytes_per_conn']:,.0f} B/conn ({b['connections']} conns)")
            self.stop([raw, engine])

    def phase_max(self) -> None:
        """As many idle connections as one engine process takes, up to ``max_connections``."""
        s = self.s
        engine, ports = self.dev_engine("engine-max", DEFAULT_ENTRY, )
        wait_port(ports["client"], engine)
        url = f"ws://127.0.0.1:{ports['client']}"
        count = math.ceil(s.max_connections / PER_IDLE_PROCESS)
        share = math.ceil(s.max_connections / count)
        drivers = []
        for i in range(count):
            driver = self.driver(f"loadgen-max-{i}", "idle", "--clients", url, "--n", str(share),
                                 "--parallel", "64", "--connect-timeout", "150")
            driver.ready()
            drivers.append(driver)
        start = time.monotonic()
        for driver in drivers:
            driver.send("run")
        answers = [d.answer(timeout=200) for d in drivers]
        seconds = time.monotonic() - start
        time.sleep(1.0)
        alive = engine.popen.poll() is None
        held = sum(a["alive"] for a in answers)
        self.max_connections = {
            "target": s.max_connections, "held": held, "failed": sum(a["failed"] for a in answers),
            "seconds": seconds, "engine_alive": alive,
            "rss_mib": rss_kib(engine.pid) / 1024 if alive else None,
        }
        self.say(f"  max conns: {self.max_connections}")
        self.stop(drivers + [engine])

    # Report ----------------------------------------------------------------------------------

    def report(self, elapsed: float) -> tuple[dict, str]:
        rows = [row.summary() for row in self.rows.values() if row.ours or row.base]
        result = {
            "date": datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds"),
            "settings": dataclasses.asdict(self.s),
            "commit": git_state(),
            "load_average_start": self.load_start,
            "load_average_end": list(os.getloadavg()),
            "cores": os.cpu_count(),
            "seconds": elapsed,
            "rows": rows,
            "latency": {k: {f: _median(v) for f, v in d.items()} for k, d in self.latency.items()},
            "max_connections": self.max_connections,
            "profiles": self.profiles,
            "errors": self.errors,
        }
        return result, render(result)

    def summarise_profiles(self) -> None:
        for key, path in list(self.profiles.items()):
            if Path(path).exists():
                summary = Path(path).with_suffix(".summary.txt")
                summary.write_text(summarise_profile(Path(path)))
                self.profiles[key] = str(summary)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{value:.2f}"
    return f"{value:,.0f}"


def _cpm(row: dict) -> str:
    ours, base = row.get("ours_cpu_per_msg_us"), row.get("base_cpu_per_msg_us")
    if ours is None and base is None:
        return "-"
    return f"{'-' if ours is None else f'{ours:.1f}'} / {'-' if base is None else f'{base:.1f}'}"


def render(result: dict) -> str:
    """The Markdown table (also what is printed)."""
    s = result["settings"]
    lines = [
        (f"connmix-tx benchmark, {result['date']}, {s['name']} run ({s['rounds']} rounds of "
        f"{s['warmup']:g}+{s['duration']:g} s, median), commit {result['commit']}"),
        (f"{result['cores']} cores, load average {result['load_average_start'][0]:.2f} at start, "
        f"{result['load_average_end'][0]:.2f} at end; {result['seconds']:.0f} s"),
        "",
        ("| path | unit | ours | baseline (same run) | ratio | target | result "
        "| server cores ours / base | loadgen cores ours / base | ratio per server CPU-s "
        "| server CPU µs/msg ours / base | CPU/msg ratio |"),
        "|---|---|---:|---:|---:|---|---|---|---|---:|---|---:|",
    ]
    for row in result["rows"]:
        cpu = loadgen = "-"
        if row["ours_cpu"] is not None:
            cpu = f"{row['ours_cpu']:.2f} / {row['base_cpu']:.2f}"
            loadgen = f"{row['ours_loadgen_cpu']:.2f} / {row['base_loadgen_cpu']:.2f}"
        lines.append(
            f"| {row['path']} | {row['unit']} | {_fmt(row['ours'])} | {_fmt(row['base'])} ({row['baseline']}) "
            f"| {_fmt(row['ratio'], 'ratio')} | {row['target']} | {row['verdict']} | {cpu} | {loadgen} "
            f"| {_fmt(row['ratio_per_server_cpu'], 'ratio')} | {_cpm(row)} "
            f"| {_fmt(row.get('cpu_per_msg_ratio'), 'ratio')} |"
        )
    if result["latency"]:
        lines += ["", f"Latency at a fixed {s['latency_rate']:g} msg/s (median of rounds):", "",
                  "| path | p50 ms | p99 ms |", "|---|---:|---:|"]
        for key, value in result["latency"].items():
            p50, p99 = value.get("p50_ms"), value.get("p99_ms")
            lines.append(f"| {key} | {'-' if p50 is None else f'{p50:.2f}'} | {'-' if p99 is None else f'{p99:.2f}'} |")
    m = result["max_connections"]
    if m:
        bound = " (the bound of this run)" if m["held"] >= m["target"] else ""
        lines += ["", (f"Max connections of one engine process: {m['held']:,} held of {m['target']:,} "
                  f"attempted{bound}, {m['failed']} failed, in {m['seconds']:.0f} s; engine "
                  f"{'alive' if m['engine_alive'] else 'DEAD'}, RSS {_fmt(m['rss_mib'])} MiB")]
    notes = [f"- {row['key']}: {row['note']}" for row in result["rows"] if row["note"]]
    notes += [f"- {name}: {count} failed requests or connects" for name, count in result["errors"].items()]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def summarise_profile(path: Path, top: int = 20) -> str:
    """Self and inclusive sample counts per function from a py-spy ``--format raw`` file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{path.name}: {total} samples", "", "self:"]
    out += [f"{100 * n / max(total, 1):5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["", "inclusive (reactor and twistd plumbing left out):"]
    below = [(name, n) for name, n in inclusive.most_common() if not _plumbing(name)]
    out += [f"{100 * n / max(total, 1):5.1f}%  {name}" for name, n in below[:top]]
    return "\n".join(out) + "\n"


#: Frames every sample of a twistd process goes through: the run loop, not the work.
PLUMBING = ("(application/", "(scripts/", "(internet/base.py)", "(internet/epollreactor.py)",
            "(internet/posixbase.py)", "(python/log.py)", "(python/context.py)", "<module>")


def _plumbing(name: str) -> bool:
    return any(part in name for part in PLUMBING)


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: lines of one function merged."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(file).parts[-2:]) if file else ""
    return f"{name} ({short})" if short else name


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "connmix_tx", "lua"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted engine changes" if dirty else "")


PHASES: dict[str, Callable[[Bench], None]] = {
    "cluster": Bench.phase_cluster,
    "mesh": Bench.phase_mesh,
    "publish": Bench.phase_publish,
    "memory": Bench.phase_memory,
    "max": Bench.phase_max,
    "queue": Bench.phase_queue,
    "workers": Bench.phase_workers,
}


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="connmix-tx benchmarks against raw Autobahn (issue 6)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_true", help="about a minute")
    kind.add_argument("--smoke", action="store_true", help="seconds, tiny numbers (the smoke test)")
    parser.add_argument("--rounds", type=int, help="A/B rounds per row")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases to run: {','.join(PHASES)}")
    parser.add_argument("--clients", type=int, help="clients of the throughput rows (window stays the same)")
    parser.add_argument("--profile", action="store_true", help="py-spy on the engine during round 1")
    parser.add_argument("--out", default=str(REPO / "reports" / "bench"), help="folder for the reports")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.rounds:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.clients:
        settings = dataclasses.replace(settings, clients=args.clients)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / stamp
    bench = Bench(settings, out, args.profile)
    bench.load_start = list(os.getloadavg())
    # SIGTERM ends the run like Ctrl-C: the finally below stops every process by its pid.
    signal.signal(signal.SIGTERM, _interrupted)
    start = time.monotonic()
    try:
        for phase in phases:
            bench.say(f"[{time.monotonic() - start:5.1f} s] {phase}")
            PHASES[phase](bench)
    except BenchError as e:
        bench.say(f"bench failed: {e}")
        return 1
    finally:
        bench.stop_all()
    bench.summarise_profiles()
    result, table = bench.report(time.monotonic() - start)
    print(table, flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table)
    for name, text in (("latest.json", json.dumps(result, indent=2)), ("latest.md", table)):
        (Path(args.out) / name).write_text(text)
    bench.say(f"reports in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
