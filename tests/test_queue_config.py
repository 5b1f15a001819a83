"""``engine.luavm.queue`` keys of the acknowledged / durable queues (docs/queues.md)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from connmix_tx.config import ConfigError, default_config, load_config, reload_diff


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "entry.websocket.lua").write_text("-- entry\n")
    return tmp_path


def load(workdir: Path, text: str):  # type: ignore[no-untyped-def]
    path = workdir / "connmix.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), role="dev", cwd=str(workdir))


def test_defaults(workdir: Path) -> None:
    queue = default_config(cwd=str(workdir)).engine.luavm.queue
    assert (queue.backend, queue.redis, queue.prefix, queue.ack_timeout) == (
        "memory", "default", "connmix:queue:", 30.0)


def test_redis_backend_names_a_configured_entry(workdir: Path) -> None:
    config = load(workdir, """
        engine:
          luavm:
            queue: {backend: redis, redis: jobs, prefix: "q:", ackTimeout: 2.5}
            redis:
              - {name: default}
              - {name: jobs, addr: "10.0.0.5:6380"}
    """)
    queue = config.engine.luavm.queue
    assert (queue.backend, queue.redis, queue.prefix, queue.ack_timeout) == ("redis", "jobs", "q:", 2.5)


@pytest.mark.parametrize("queue, problem", [
    ("{backend: redis, redis: nope}", "engine.luavm.queue.redis: no engine.luavm.redis entry is named 'nope'"),
    ("{backend: disk}", "engine.luavm.queue.backend: expected one of memory, redis"),
    ("{ackTimeout: 0}", "engine.luavm.queue.ackTimeout: expected number > 0"),
    ("{ackTimeout: -1}", "engine.luavm.queue.ackTimeout"),
    ("{redis: ''}", "engine.luavm.queue.redis"),
    ("{prefix: 5}", "engine.luavm.queue.prefix"),
])
def test_bad_queue_keys_are_refused_with_their_path(workdir: Path, queue: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(workdir, f"engine:\n  luavm:\n    queue: {queue}\n")
    assert problem in str(info.value)


def test_memory_backend_does_not_need_the_named_entry(workdir: Path) -> None:
    config = load(workdir, "engine:\n  luavm:\n    redis: [{name: cache}]\n")
    assert config.engine.luavm.queue.backend == "memory"


def test_ack_timeout_is_hot_the_backend_is_not(workdir: Path) -> None:
    old = load(workdir, "")
    new = load(workdir, "engine:\n  luavm:\n    queue: {ackTimeout: 5, backend: redis, prefix: 'x:'}\n")
    hot, cold = reload_diff(old, new)
    assert "engine.luavm.queue.ackTimeout" in hot
    assert set(cold) >= {"engine.luavm.queue.backend", "engine.luavm.queue.prefix"}
