"""``/metrics`` of a multi-process engine: each worker serves its snapshot on a Unix socket, the
worker taking the scrape sums them (real sockets, one process playing two workers)."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from connmix_tx.metrics import EngineMeter
from connmix_tx.tally import exposition
from connmix_tx.worker_metrics import SiblingMetrics, socket_path


def _samples(text: bytes) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


@pytest_twisted.inlineCallbacks
def test_the_scraped_worker_sums_its_siblings_and_skips_a_silent_one(tmp_path: Path):
    meters = [EngineMeter(lua="LuaJIT 2.1"), EngineMeter(lua="LuaJIT 2.1")]
    for meter, reads in zip(meters, (3, 4)):
        meter.server("websocket", "lua/entry.lua").read.inc(reads)
        meter.gauge("connmix_engine_channels", "Channels", lambda reads=reads: [((), reads * 10)])
    workers = [SiblingMetrics(reactor, str(tmp_path), i, m.snapshot, timeout=1) for i, m in enumerate(meters)]
    for worker in workers:
        worker.privilegedStartService()
        worker.startService()
    # A socket file nobody serves (a worker that died) is left out, not waited for forever.
    Path(socket_path(str(tmp_path), 7)).touch()
    try:
        snapshots = yield workers[0].gather()
    finally:
        for worker in workers:
            yield worker.stopService()
    text = _samples(exposition(snapshots))
    assert text[("connmix_engine_servers_read_messages_total", (("protocol", "websocket"),))] == 7
    assert text[("connmix_engine_channels", ())] == 70
    build = [v for (name, _), v in text.items() if name == "connmix_build_info"]
    assert build == [1]
