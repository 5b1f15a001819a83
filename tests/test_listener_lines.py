"""One start line per listener: Twisted's own port lines do not reach the log.

Twisted's listening ports log ``QuietSite starting on 6789`` and ``(TCP Port 6789 Closed)`` by
themselves; factories log ``Starting factory …`` / ``Stopping factory …`` unless they are quiet
(ours are; Twisted's HTTP client pool behind ``mix.http`` is not).  Every listener already logs
its own start line (``start the api server (…)``), so the log observer drops those lines.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogPublisher, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from conftest import REPO
from procs import Process, free_ports, twistd, write_yaml
from connmix_tx.logs import LogControl

NOISE = re.compile(r"starting on|Starting factory|Stopping factory|Port \d+ Closed")


def legacy_publisher(control: LogControl) -> legacy_log.LogPublisher:
    """``twisted.python.log.msg`` as Twisted's ports call it, feeding ``control``."""
    publisher = LogPublisher(control.observer())
    return legacy_log.LogPublisher(observerPublisher=publisher, publishPublisher=publisher)


def test_port_lines_of_twisted_are_dropped_and_other_legacy_lines_kept() -> None:
    stream = io.StringIO()
    legacy = legacy_publisher(LogControl(stream=stream))
    legacy.msg("GuardedPBServerFactory starting on 6786")
    legacy.msg("QuietSite starting on 6789")
    legacy.msg("(TCP Port 6789 Closed)")
    legacy.msg("(TLS Port 6790 Closed)")
    legacy.msg("(Port '/tmp/api.sock' Closed)")
    legacy.msg("a legacy line that stays")
    legacy.msg("the port is starting on time, really")  # more than one word before "starting on"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        legacy.msg(failure=Failure(), why="QuietSite starting on 6789", isError=1)
    messages = [line.split("\t")[3] for line in stream.getvalue().splitlines() if "\t" in line]
    assert messages == [
        "a legacy line that stays",
        "the port is starting on time, really",
        "QuietSite starting on 6789",  # an error is never dropped
    ]


def test_factory_lines_of_noisy_factories_are_dropped() -> None:
    """A plain ``Factory`` (as client endpoints and Twisted's HTTP client pool use) is noisy."""
    stream = io.StringIO()
    observer = LogControl(stream=stream).observer()
    globalLogPublisher.addObserver(observer)
    try:
        factory = Factory.forProtocol(Protocol)
        assert factory.noisy
        factory.doStart()
        factory.doStop()
        legacy_log.msg("after the factory")
    finally:
        globalLogPublisher.removeObserver(observer)
    messages = [line.split("\t")[3] for line in stream.getvalue().splitlines() if "\t" in line]
    assert messages == ["after the factory"]


ENTRY = """
function on_handshake(client_id, headers, server)
end

function on_message(msg)
  local resp, err = mix.http.request("GET", mix.server.option("probe"))
  mix.websocket():send(resp and resp.body or ("error: " .. tostring(err)))
end

function on_close(client_id, err)
end
"""


def test_dev_process_logs_one_start_line_per_listener_and_no_twisted_port_lines(tmp_path: Path) -> None:
    registry, center_api, mesh, api, first, second = free_ports(6)
    (tmp_path / "probe.lua").write_text(ENTRY)
    probe = [{"name": "probe", "value": f"http://127.0.0.1:{center_api}/version"}]
    config = write_yaml(tmp_path / "dev.yaml", {
        "center": {"registry": {"bind": "127.0.0.1", "port": registry},
                   "apiServer": {"bind": "127.0.0.1", "port": center_api}},
        "engine": {
            "meshPoint": {"bind": "127.0.0.1", "port": mesh},
            "apiServer": {"bind": "127.0.0.1", "port": api},
            "servers": [
                {"bind": "127.0.0.1", "port": first, "entry": "probe.lua", "options": probe},
                {"bind": "127.0.0.1", "port": second, "protocol": "socket", "entry": "lua/entry.socket.lua"},
            ],
        },
    })
    process = Process(twistd("--dev", "-f", str(config)), tmp_path)
    try:
        process.wait_for_line(rf"start the protocol server .*\(127\.0\.0\.1:{second}\)")
        # Each message makes the Lua script open an HTTP connection (mix.http.request).
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{first}") as client:
            for _ in range(2):
                client.send("go")
                assert client.recv(timeout=10) == '{"apis":["v1"]}'
    finally:
        code = process.stop()
    assert code == 0
    text = "\n".join(process.lines)
    start_lines = [
        f"start the registry server (127.0.0.1:{registry})",
        f"start the center api server (127.0.0.1:{center_api})",
        f"start the mesh node (127.0.0.1:{mesh})",
        f"start the api server (127.0.0.1:{api})",
        f"start the protocol server {tmp_path / 'probe.lua'} (127.0.0.1:{first})",
        f"start the protocol server {REPO / 'lua' / 'entry.socket.lua'} (127.0.0.1:{second})",
    ]
    for line in start_lines:
        assert sum(entry.endswith("\t" + line) for entry in process.lines) == 1, f"{line!r} in:\n{text}"
    # Apart from the engine dialling the registry, only the start line names a listener's port.
    dialled = f"center registry 127.0.0.1:{registry} connect successful"
    for port in (registry, center_api, mesh, api, first, second):
        naming = [entry for entry in process.lines if re.search(rf"\b{port}\b", entry) and dialled not in entry]
        assert len(naming) == 1, f"port {port} named by {naming}"
    assert not [entry for entry in process.lines if NOISE.search(entry)], text
