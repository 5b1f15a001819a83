"""The benchmark suite runs end to end (``bench/run.py --smoke``): every row yields a number.

Tiny sizes, loopback only, bounded in time; no assertion on any figure (the machine is shared).
Needs the ``bench`` extra (picows, uvloop) and py-spy is not used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("picows")
pytest.importorskip("uvloop")

REPO = Path(__file__).resolve().parent.parent
ROWS = {"inbound", "send", "publish", "cross", "lua", "memory", "handshake", "scale",
        "w_echo", "w_publish", "w_inbound", "w_conns"}


def test_smoke_run_prints_a_table_with_every_row(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| path | unit | ours | baseline (same run) | ratio |" in run.stdout
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    result = json.loads((folder / "results.json").read_text())
    rows = ROWS | ({"queue_redis"} if shutil.which("redis-server") else set())
    assert {row["key"] for row in result["rows"]} == rows
    for row in result["rows"]:
        assert isinstance(row["ours"], float) and isinstance(row["base"], float), row
        assert row["verdict"] in ("PASS", "MISS"), row
    assert set(result["latency"]) == {"inbound", "inbound raw echo", "mesh.send", "mesh.send raw push"}
    for value in result["latency"].values():
        assert isinstance(value["p50_ms"], float) and isinstance(value["p99_ms"], float)
    assert result["max_connections"]["held"] > 0
    assert (tmp_path / "latest.md").read_text() == (folder / "table.md").read_text()
    assert not list(folder.glob("profile-*"))  # py-spy only with --profile
