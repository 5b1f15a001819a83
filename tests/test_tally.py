"""Plain-integer tallies: snapshots, sums across processes, and the Prometheus text they give."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from connmix_tx.tally import INFO, Meters, exposition, merge


def _samples(text: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _meters(pushes: int, waiting: int) -> Meters:
    m = Meters()
    push = m.counter("connmix_engine_queue_push", "Queue pushes", ("topic", "result"))
    push.child("foo", "ok").inc(pushes)
    timing = m.summary("connmix_engine_servers_send_duration_seconds", "Send time", ("protocol",))
    timing.child("websocket").observe(0.5)
    m.gauge("connmix_engine_queue_length", "Waiting", lambda: [(("foo",), waiting)], ("topic",))
    m.gauge("connmix_build_info", "Build", lambda: [(("1.0",), 1)], ("version",), kind=INFO)
    return m


def test_one_process_renders_counters_summaries_and_gauges() -> None:
    s = _samples(exposition([_meters(3, 7).snapshot()]))
    assert s[("connmix_engine_queue_push_total", (("result", "ok"), ("topic", "foo")))] == 3
    assert s[("connmix_engine_servers_send_duration_seconds_count", (("protocol", "websocket"),))] == 1
    assert s[("connmix_engine_servers_send_duration_seconds_sum", (("protocol", "websocket"),))] == 0.5
    assert s[("connmix_engine_queue_length", (("topic", "foo"),))] == 7
    assert s[("connmix_build_info", (("version", "1.0"),))] == 1


def test_snapshots_of_several_workers_are_summed_but_build_info_is_not() -> None:
    text = exposition([_meters(3, 7).snapshot(), _meters(4, 1).snapshot()])
    s = _samples(text)
    assert s[("connmix_engine_queue_push_total", (("result", "ok"), ("topic", "foo")))] == 7
    assert s[("connmix_engine_servers_send_duration_seconds_count", (("protocol", "websocket"),))] == 2
    assert s[("connmix_engine_queue_length", (("topic", "foo"),))] == 8
    assert s[("connmix_build_info", (("version", "1.0"),))] == 1


def test_labels_only_one_worker_has_are_kept_and_snapshots_are_plain_data() -> None:
    a, b = Meters(), Meters()
    a.counter("c", "c", ("topic",)).child("x").inc()
    b.counter("c", "c", ("topic",)).child("y").inc(2)
    merged = merge([a.snapshot(), b.snapshot()])
    assert merged == [["c", "c", "counter", ["topic"], [[["x"], 1], [["y"], 2]]]]
    import msgpack
    assert msgpack.unpackb(msgpack.packb(a.snapshot()), raw=False) == a.snapshot()
