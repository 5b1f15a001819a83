"""``engine.workers`` and ``-p``: the key, its range, and the mesh port range it reserves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from twisted.python import usage

from connmix_tx.config import roles as config_module
from connmix_tx.config import (
    ConfigError, default_config, load_config, reload_diff, worker_count, worker_mesh_ports,
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "entry.websocket.lua").write_text("-- entry\n")
    return tmp_path


def load(workdir: Path, text: str, role: str = "dev", workers: int | None = None):
    path = workdir / "connmix.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), role=role, cwd=str(workdir), workers=workers)


def error_of(workdir: Path, text: str, role: str = "dev", workers: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(workdir, text, role, workers)
    return str(info.value)


def test_default_is_one_worker(workdir: Path) -> None:
    assert default_config(cwd=str(workdir)).engine.workers == 1
    assert load_config(role="dev", cwd=str(workdir)).engine.workers == 1  # etc/connmix.yaml says so


@pytest.mark.parametrize("value", [0, 1, 2, 64])
def test_workers_accepts_0_to_64(workdir: Path, value: int) -> None:
    text = f"engine: {{workers: {value}, meshPoint: {{port: 7000}}}}"
    assert load(workdir, text).engine.workers == value


@pytest.mark.parametrize("text, problem", [
    ("engine: {workers: 65}", "config engine.workers: expected integer 0-64, got 65"),
    ("engine: {workers: -1}", "config engine.workers: expected integer 0-64, got -1"),
    ("engine: {workers: two}", "config engine.workers: expected integer, got string"),
    ("engine: {workers: true}", "config engine.workers: expected integer, got boolean"),
    ("engine: {workers: 1.5}", "config engine.workers: expected integer, got number"),
])
def test_bad_workers_values_are_refused(workdir: Path, text: str, problem: str) -> None:
    assert error_of(workdir, text) == problem


def test_workers_is_not_hot(workdir: Path) -> None:
    old = load(workdir, "engine: {workers: 1, meshPoint: {port: 7000}}")
    new = load(workdir, "engine: {workers: 2, meshPoint: {port: 7000}}")
    assert reload_diff(old, new) == ([], ["engine.workers"])


def test_zero_means_one_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "device_cpus", lambda: 6)
    assert worker_count(0) == 6
    assert worker_count(3) == 3
    monkeypatch.setattr(config_module, "device_cpus", lambda: 200)
    assert worker_count(0) == 64


MESH_NEXT_TO_API = """
engine:
  workers: {workers}
  meshPoint: {{port: 7000}}
  apiServer: {{port: 7002}}
  servers: [{{port: 7100}}]
"""


def test_worker_mesh_ports_skip_the_ports_of_other_listeners(workdir: Path) -> None:
    config = load(workdir, MESH_NEXT_TO_API.format(workers=3))
    assert worker_mesh_ports(config, "engine", 3) == [7000, 7001, 7003]  # 7002 is the API port


def test_the_default_ports_give_a_second_worker_the_first_free_port(workdir: Path) -> None:
    """meshPoint 6788; 6789 (API) and 6790 (protocol server) are taken: worker 1 gets 6791, so
    ``twistd -n connmix --dev -p 2`` runs on the packaged configuration."""
    config = load(workdir, "engine: {workers: 2}")
    assert worker_mesh_ports(config, "dev", 2) == [6788, 6791]
    assert worker_mesh_ports(config, "dev", 1) == [6788]


def test_dash_p_overrides_the_file_for_the_port_check(workdir: Path) -> None:
    text = "engine: {workers: 1, meshPoint: {port: 65534}}"
    assert error_of(workdir, text, workers=3).startswith("config engine.meshPoint.port: with 3 workers")
    assert load(workdir, text, workers=2).engine.workers == 1  # the file's value is kept


def test_mesh_ports_past_65535_are_refused(workdir: Path) -> None:
    text = "engine: {workers: 4, meshPoint: {port: 65534}}"
    assert error_of(workdir, text) == (
        "config engine.meshPoint.port: with 4 workers the mesh point needs 4 free ports from 65534,"
        " beyond 65535"
    )


def test_a_center_ignores_the_workers_range(workdir: Path) -> None:
    assert load(workdir, MESH_NEXT_TO_API.format(workers=3), role="center").engine.workers == 3


# --------------------------------------------------------------------------- -p on the command line


def options(*args: str):
    from connmix_tx.tap import Options

    opts = Options()
    opts.parseOptions(list(args))
    return opts


@pytest.mark.parametrize("value", ["-1", "65", "x", ""])
def test_bad_dash_p_is_a_usage_error(workdir: Path, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    with pytest.raises(usage.UsageError, match="-p/--processes must be an integer 0-64"):
        options("--dev", "-p", value)


def test_worker_options_need_an_index(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    with pytest.raises(usage.UsageError, match="--worker-of needs --worker N"):
        options("--dev", "--worker-of", "abc")


def test_help_shows_dash_p_but_not_the_internal_worker_options() -> None:
    from connmix_tx.tap import Options

    text = Options().getUsage()
    assert "-p, --processes=" in text
    assert "--worker" not in text and "--center-registry" not in text
