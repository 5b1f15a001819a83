#!/usr/bin/env python3
"""Autobahn|Testsuite conformance run against a real engine (docs/conformance.md).

Starts ``twistd -n connmix --dev`` on free loopback ports with one ``protocol: websocket`` server
running ``lua/entry.echo.lua`` (``maxMessageSize`` 16 MiB, permessage-deflate accepted), points
``wstest -m fuzzingclient`` at it, writes the report (HTML + ``index.json``) to a folder, prints
one line of counts per case group and exits 1 if any case's ``behavior`` or ``behaviorClose`` is
FAILED.  The engine is stopped by its pid whatever happens; every step is bounded in time.

The runner is the real Autobahn Testsuite (``autobahntestsuite`` on Python 2.7, installed into
``.conformance/py27`` by ``--install``); where Python 2.7 is absent, ``kosoku`` (a Python 3 runner
of the same case files) is installed into ``.conformance/py3`` and used instead.

    python conformance/run.py --install              # the fast set: 1-7, 10, 12, 13
    python conformance/run.py --all                  # 1-13, including 9.x (long)
    python conformance/run.py --cases 9.1.*,12.1.1   # any selection
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import yaml

from connmix_tx.testing import free_ports

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".conformance"
PY27_TARGET = TOOLS / "py27"
PY3_TARGET = TOOLS / "py3"
DEFAULT_OUTDIR = REPO / "reports" / "conformance"
ECHO_ENTRY = REPO / "lua" / "entry.echo.lua"

#: ``--server socket``: the same echo over a ``protocol: socket`` server whose framing is the Lua
#: RFC 6455 codec (``lua/protocols/websocket.lua``, docs/lua-api.md "socket servers").  Written into
#: the report folder next to a copy of ``lua/protocols/`` (``require`` resolves modules beside the
#: entry).
SOCKET_ECHO_ENTRY = """\
-- Echo over protocols.websocket (written by conformance/run.py for the --server socket run).
-- The codec hands over fragments (finish = false until the last one): they are joined here.
local websocket = require("protocols.websocket")
local partial = {}  -- client id -> {type, parts} of an unfinished message

function on_connect(client_id) end

function protocol_input(buf)
  return websocket.input(buf, "/")
end

function protocol_decode(packet)
  return websocket.decode(packet)
end

function protocol_encode(data, type)
  if not websocket.is_open() then return nil end
  return websocket.encode(data, type)
end

function on_message(msg)
  local conn = mix.socket.tcp()
  local id = conn:client_id()
  local pending = partial[id]
  if pending == nil and msg.finish then
    conn:send(websocket.encode(msg.data, msg.type))
    return
  end
  if pending == nil then
    pending = {type = msg.type, parts = {}}
    partial[id] = pending
  end
  pending.parts[#pending.parts + 1] = msg.data
  if msg.finish then
    partial[id] = nil
    conn:send(websocket.encode(table.concat(pending.parts), pending.type))
  end
end

function on_close(client_id, err)
  partial[client_id] = nil
  websocket.forget(client_id)
end
"""

FAST_CASES = "1-7,10,12,13"
ALL_CASES = "1-13"
#: Left out of the fast set: the 12.x / 13.x cases with 1000 messages of 32 KiB and more, or with
#: 128 KiB messages cut in small fragments (12.x.8-10 and 12.x.13-18, same numbers in 13.x).  They
#: repeat the smaller cases' code paths with bigger payloads and take ~85 % of 12/13's time;
#: ``--all`` runs them.
HEAVY_DEFLATE_CASES = tuple(
    f"{group}.{family}.{number}"
    for group, families in ((12, 5), (13, 7))
    for family in range(1, families + 1)
    for number in (8, 9, 10, 13, 14, 15, 16, 17, 18)
)
#: Case groups of the Autobahn Testsuite.  Group 8 does not exist; 11 is not in the suite either.
KNOWN_GROUPS = (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)
MESSAGE_SIZE = 16 * 1024 * 1024
#: Echoing a 16 MiB message buffers it: the slow-consumer cap must leave room for a few of them.
WRITE_BUFFER = 64 * 1024 * 1024

#: The runners.  ``autobahntestsuite`` pins its own dependencies exactly (Twisted 19.10, autobahn
#: 0.10.9, cryptography 3.3.2 ...), and that whole set still installs on Python 2.7 (wsaccel is
#: built from source: a C compiler is needed).  Both are started through ``site.addsitedir`` (not
#: PYTHONPATH) so the ``zope`` namespace package's .pth file is processed and ``zope.interface``
#: resolves from the private folder.
WSTEST = {
    "requirements": ("autobahntestsuite==25.10.1",),
    "target": PY27_TARGET,
    "probe": "import site, sys; site.addsitedir(sys.argv[1]); import autobahntestsuite.wstest",
    "launcher": "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'wstest'; "
                "from autobahntestsuite.wstest import run; run()",
}
KOSOKU = {
    "requirements": ("kosoku==0.1.0",),
    "target": PY3_TARGET,
    "probe": "import site, sys; site.addsitedir(sys.argv[1]); import kosoku._cli",
    "launcher": "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'kosoku'; "
                "from kosoku._cli import main; main()",
}

INSTALL_TIMEOUT = 900
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: Whole-run bound for the wstest process; the fast set takes a few minutes on 2 cores.
RUN_TIMEOUT = {"fast": 1500, "all": 7200}

OK, NON_STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED = (
    "OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED",
)
COLUMNS = (OK, NON_STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED)


# Case selection ------------------------------------------------------------------------------

def case_patterns(selection: str) -> list[str]:
    """Autobahn case patterns for ``1-7,10,12.1.*,9.1.1``: ranges and bare groups become ``N.*``."""
    patterns: list[str] = []
    for token in (t.strip() for t in selection.split(",")):
        if not token:
            continue
        span = re.fullmatch(r"(\d+)-(\d+)", token)
        if span:
            low, high = int(span.group(1)), int(span.group(2))
            if low > high:
                raise ValueError(f"empty range {token!r}")
            patterns += [f"{g}.*" for g in KNOWN_GROUPS if low <= g <= high]
        elif token.isdigit():
            patterns.append(f"{int(token)}.*")
        elif re.fullmatch(r"\d+(\.(\d+|\*))*", token):
            patterns.append(token)
        else:
            raise ValueError(f"bad case selection {token!r}")
    if not patterns:
        raise ValueError("no cases selected")
    return patterns


def wants_compression(patterns: Iterable[str]) -> bool:
    return any(p.split(".")[0] in ("12", "13") for p in patterns)


# Installing the runners ------------------------------------------------------------------------

def python27() -> str | None:
    """The Python 2.7 interpreter: ``$PYTHON27``, pyenv's 2.7.18, or ``python2.7`` on PATH."""
    candidates = [os.environ.get("PYTHON27", "")]
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=20).stdout.strip()
        candidates.append(os.path.join(root, "versions", "2.7.18", "bin", "python"))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(os.path.expanduser("~/.pyenv/versions/2.7.18/bin/python"))
    candidates.append(shutil.which("python2.7") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def installed(python: str, runner: dict[str, Any], target: Path | None = None) -> bool:
    """True when ``runner`` imports from its folder (or ``target``) with ``python``."""
    target = target or runner["target"]
    if not target.is_dir():
        return False
    result = subprocess.run([python, "-c", runner["probe"], str(target)], capture_output=True, timeout=120)
    return result.returncode == 0


def install(python: str, runner: dict[str, Any]) -> None:
    """``pip install --target`` into a fresh folder, moved into place only once it imports."""
    target: Path = runner["target"]
    if installed(python, runner):
        return
    requirements = runner["requirements"]
    print(f"conformance: installing {' '.join(requirements)} into {target.relative_to(REPO)} ...", flush=True)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        command = [python, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
                   "--disable-pip-version-check", "--target", str(staging), *requirements]
        log_file = target.parent / f"install-{target.name}.log"
        with open(log_file, "wb") as log:
            # cwd: not the repository, whose egg-info pip would take for an installed package.
            result = subprocess.run(command, cwd=target.parent, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=INSTALL_TIMEOUT)
        if result.returncode != 0:
            raise SystemExit(f"conformance: pip failed ({result.returncode}):\n"
                             + log_file.read_text(errors="replace")[-3000:])
        if not installed(python, runner, staging):
            raise SystemExit(f"conformance: the runner installed into {staging} does not import")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"conformance: installed in {time.monotonic() - started:.0f} s", flush=True)


def pick_runner(choice: str, do_install: bool) -> tuple[str, list[str]]:
    """``(name, argv prefix)`` of the runner to use: wstest on Python 2.7, else kosoku."""
    py27 = python27()
    if choice in ("auto", "wstest") and py27 is not None:
        if do_install:
            install(py27, WSTEST)
        if installed(py27, WSTEST):
            return "wstest", [py27, "-c", WSTEST["launcher"], str(PY27_TARGET)]
        if choice == "wstest":
            raise SystemExit(f"conformance: no testsuite in {PY27_TARGET}; run with --install")
    elif choice == "wstest":
        raise SystemExit("conformance: Python 2.7 not found (set PYTHON27 or install it with pyenv)")
    if do_install:
        install(sys.executable, KOSOKU)
    if installed(sys.executable, KOSOKU):
        return "kosoku", [sys.executable, "-c", KOSOKU["launcher"], str(PY3_TARGET)]
    raise SystemExit("conformance: no runner installed; run with --install")


# The engine under test -------------------------------------------------------------------------



def socket_echo_entry(outdir: Path) -> Path:
    """Write the socket echo entry and a copy of ``lua/protocols/`` under ``outdir/lua``."""
    folder = outdir / "lua"
    shutil.copytree(REPO / "lua" / "protocols", folder / "protocols")
    entry = folder / "entry.socket.echo.lua"
    entry.write_text(SOCKET_ECHO_ENTRY)
    return entry


def engine_config(ports: list[int], entry: Path, compression: bool, kind: str) -> dict[str, Any]:
    registry, center_api, mesh, api, client = ports
    loopback = "127.0.0.1"
    server: dict[str, Any] = {
        "protocol": kind,
        "bind": loopback,
        "port": client,
        "entry": str(entry),
        "byteCodeExpires": 0,
        "maxMessageSize": MESSAGE_SIZE,
        "maxWriteBuffer": WRITE_BUFFER,
    }
    if kind == "websocket":
        server["compression"] = compression
    return {
        "logging": {"level": "warn"},
        "center": {
            "registry": {"bind": loopback, "port": registry},
            "apiServer": {"bind": loopback, "port": center_api},
        },
        "engine": {
            "centerRegistry": f"{loopback}:{registry}",
            "meshPoint": {"bind": loopback, "port": mesh},
            "apiServer": {"bind": loopback, "port": api},
            "servers": [server],
        },
    }


class Engine:
    """``twistd -n connmix --dev -f FILE`` in a process of its own, output to a log file."""

    def __init__(self, config_file: Path, log_file: Path, port: int) -> None:
        self.port = port
        self.log_file = log_file
        self._log = open(log_file, "wb")
        command = [sys.executable, "-c",
                   "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "connmix", "--dev", "-f", str(config_file)]
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"conformance: the engine exited with {self.proc.returncode}:\n"
                                 + self.log_file.read_text(errors="replace")[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"conformance: the engine did not listen on {self.port} in {START_TIMEOUT:.0f} s")

    def stop(self) -> int | None:
        """SIGTERM by pid, SIGKILL if it has not ended within 10 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


# Running and reading the report ----------------------------------------------------------------

def run_cases(runner: tuple[str, list[str]], url: str, patterns: list[str], excluded: list[str],
              outdir: Path, timeout: float) -> int:
    """Run the fuzzing client; return its exit code (the verdict comes from ``index.json``)."""
    name, argv = runner
    if name == "wstest":
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": "connmix-tx", "url": url}],
            "cases": patterns,
            "exclude-cases": excluded,
            "exclude-agent-cases": {},
        }
        spec_file = outdir / "fuzzingclient.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        command = [*argv, "-m", "fuzzingclient", "-s", str(spec_file)]
        cwd = outdir
    else:
        command = [*argv, "-m", "fuzzingclient", url.removeprefix("ws://"), "-o", str(outdir)]
        for pattern in patterns:
            command += ["-i", pattern]
        for case in excluded:
            command += ["-x", case]
        cwd = outdir
    with open(outdir / f"{name}.log", "wb") as log_file:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise SystemExit(f"conformance: {name} did not finish within {timeout:.0f} s "
                             f"(log: {outdir / (name + '.log')})")


def read_index(outdir: Path) -> dict[str, dict[str, Any]]:
    """The cases of the one agent in ``index.json``: case id -> entry."""
    index_file = outdir / "index.json"
    if not index_file.exists():
        raise SystemExit(f"conformance: no {index_file}: the runner produced no report")
    index = json.loads(index_file.read_text())
    if len(index) != 1:
        raise SystemExit(f"conformance: expected one agent in {index_file}, got {sorted(index)}")
    return next(iter(index.values()))


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def verdict(entry: dict[str, Any]) -> str:
    """One word per case: FAILED if either behaviour failed, else the weaker of the two."""
    behaviors = (entry.get("behavior", FAILED), entry.get("behaviorClose", FAILED))
    for word in (FAILED, UNIMPLEMENTED, NON_STRICT, INFORMATIONAL):
        if word in behaviors:
            return word
    return OK


def summarize(cases: dict[str, dict[str, Any]]) -> tuple[dict[str, Counter], list[str]]:
    """Counts per case group and the sorted ids of the FAILED cases."""
    groups: dict[str, Counter] = {}
    failed: list[str] = []
    for case_id in sorted(cases, key=case_key):
        word = verdict(cases[case_id])
        groups.setdefault(case_id.split(".")[0], Counter())[word] += 1
        if word == FAILED:
            failed.append(case_id)
    return groups, failed


def table(groups: dict[str, Counter]) -> str:
    """A Markdown table: one row per group and a total."""
    header = "| group | cases | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    total: Counter = Counter()
    for group in sorted(groups, key=int):
        counts = groups[group]
        total.update(counts)
        lines.append(f"| {group} | {sum(counts.values())} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    lines.append(f"| all | {sum(total.values())} | " + " | ".join(str(total[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


# Command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--cases", default=None,
                           help="case groups/ids, e.g. '1-7,10,12,13' or '9.1.*' (default: the fast set, "
                           f"{FAST_CASES} without the heavy 12.x/13.x cases)")
    selection.add_argument("--all", action="store_true", help=f"every group ({ALL_CASES}, including 9.x)")
    parser.add_argument("--exclude", default="", help="case ids/patterns to leave out, same syntax")
    parser.add_argument("--install", action="store_true",
                        help="install the runner into .conformance/ if it is missing")
    parser.add_argument("--runner", choices=("auto", "wstest", "kosoku"), default="auto",
                        help="auto: wstest on Python 2.7 when present, else kosoku")
    parser.add_argument("--compression", choices=("auto", "on", "off"), default="auto",
                        help="accept permessage-deflate (auto: on when 12.x or 13.x are selected)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on UNIMPLEMENTED cases (12.x/13.x when permessage-deflate "
                        "was requested but the engine did not accept it)")
    parser.add_argument("--outdir", type=Path, default=DEFAULT_OUTDIR, help="report folder")
    parser.add_argument("--timeout", type=float, default=None, help="bound for the fuzzing run, seconds")
    parser.add_argument("--server", choices=("websocket", "socket"), default="websocket",
                        help="websocket: Autobahn framing (lua/entry.echo.lua); socket: the Lua "
                        "RFC 6455 codec lua/protocols/websocket.lua (no permessage-deflate)")
    parser.add_argument("--entry", type=Path, default=None, help="another echo entry script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        patterns = case_patterns(ALL_CASES if args.all else args.cases or FAST_CASES)
        excluded = [] if args.all or args.cases else list(HEAVY_DEFLATE_CASES)
        excluded += case_patterns(args.exclude) if args.exclude else []
    except ValueError as e:
        raise SystemExit(f"conformance: {e}") from None
    compression = {"on": True, "off": False}.get(args.compression, wants_compression(patterns))
    compression = compression and args.server == "websocket"
    runner = pick_runner(args.runner, args.install)
    timeout = args.timeout or RUN_TIMEOUT["all" if args.all or "9.*" in patterns else "fast"]

    outdir: Path = args.outdir.resolve()
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    ports = free_ports(5)
    if args.entry is not None:
        entry = args.entry.resolve()
    else:
        entry = ECHO_ENTRY if args.server == "websocket" else socket_echo_entry(outdir)
    config_file = outdir / "engine.yaml"
    config_file.write_text(yaml.safe_dump(engine_config(ports, entry, compression, args.server)))

    print(f"conformance: {runner[0]} against {args.server} server {entry.name} (compression "
          f"{'on' if compression else 'off'}), cases {','.join(patterns)}"
          + (f" minus {len(excluded)} heavy or excluded" if excluded else ""), flush=True)
    started = time.monotonic()
    engine = Engine(config_file, outdir / "engine.log", ports[-1])
    try:
        engine.wait_listening()
        code = run_cases(runner, f"ws://127.0.0.1:{ports[-1]}", patterns, excluded, outdir, timeout)
    finally:
        exit_code = engine.stop()
    elapsed = time.monotonic() - started

    cases = read_index(outdir)
    groups, failed = summarize(cases)
    print(table(groups))
    print(f"{len(cases)} cases in {elapsed:.0f} s; report: {outdir / 'index.html'}")
    if exit_code not in (0, None):
        print(f"conformance: the engine exited with {exit_code} (log: {outdir / 'engine.log'})")
    if failed:
        print(f"conformance: FAILED cases: {', '.join(failed)}")
        return 1
    unimplemented = sum(counts[UNIMPLEMENTED] for counts in groups.values())
    if unimplemented:
        print(f"conformance: {unimplemented} cases UNIMPLEMENTED (12.x/13.x: the engine did not accept "
              f"permessage-deflate{'' if compression else '; compression was off'})")
        if args.strict:
            return 1
    if code != 0 and runner[0] == "wstest":
        print(f"conformance: {runner[0]} exited with {code}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
