"""``/metrics`` of a multi-process engine: the workers' expositions summed into one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from connmix_tx.worker_metrics import merge_expositions


def worker_text(clients: int, reads: int, created: float, latencies: list[float]) -> str:
    registry = CollectorRegistry()
    Gauge("connmix_build_info", "Build", ["version"], registry=registry).labels("0.1.0").set(1)
    Gauge("connmix_engine_servers_clients", "Clients", ["protocol"], registry=registry).labels("websocket").set(clients)
    counter = Counter("connmix_engine_servers_read_messages", "Reads", ["protocol"], registry=registry)
    counter.labels("websocket").inc(reads)
    histogram = Histogram("connmix_engine_servers_send_duration_seconds", "Sends", buckets=(0.1, 1.0),
                          registry=registry)
    for value in latencies:
        histogram.observe(value)
    text = generate_latest(registry).decode()
    # Pin the creation stamps so the test knows which one is the earliest.
    return "\n".join(
        line.rsplit(" ", 1)[0] + f" {created}" if line.startswith("connmix_") and "_created" in line.split(" ")[0]
        else line for line in text.splitlines()) + "\n"


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_series_are_summed_created_takes_the_earliest_and_info_stays_one() -> None:
    merged = samples(merge_expositions([
        worker_text(3, 10, 200.0, [0.05, 0.5]),
        worker_text(4, 1, 100.0, [2.0]),
    ]))
    ws = (("protocol", "websocket"),)
    assert merged[("connmix_engine_servers_clients", ws)] == 7
    assert merged[("connmix_engine_servers_read_messages_total", ws)] == 11
    assert merged[("connmix_engine_servers_read_messages_created", ws)] == 100.0
    assert merged[("connmix_build_info", (("version", "0.1.0"),))] == 1
    buckets = {dict(labels)["le"]: value for (name, labels), value in merged.items()
               if name == "connmix_engine_servers_send_duration_seconds_bucket"}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
    assert merged[("connmix_engine_servers_send_duration_seconds_count", ())] == 3


def test_a_series_only_one_worker_has_is_kept() -> None:
    registry = CollectorRegistry()
    Gauge("connmix_engine_queue_length", "Waiting", ["topic"], registry=registry).labels("foo").set(5)
    merged = samples(merge_expositions([worker_text(1, 1, 1.0, []), generate_latest(registry).decode()]))
    assert merged[("connmix_engine_queue_length", (("topic", "foo"),))] == 5
    assert merged[("connmix_engine_servers_clients", (("protocol", "websocket"),))] == 1


def test_one_worker_alone_is_its_own_exposition() -> None:
    text = worker_text(2, 5, 1.0, [0.2])
    assert samples(merge_expositions([text])) == samples(text.encode())
