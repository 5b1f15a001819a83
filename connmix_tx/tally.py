"""Plain-integer tallies and their Prometheus text (docs/operations.md, "Metrics").

The engine counts with ``Count`` and ``Timing`` objects: one attribute add per event, no lock
(everything runs on the reactor thread), nothing from prometheus_client on the hot path.  A
``Meters`` table holds the families; ``snapshot()`` turns them, and the gauges read from live
objects at that moment, into plain data (lists and numbers, msgpack- and JSON-friendly) and
``exposition()`` turns one or more snapshots into the Prometheus text format, summing samples with
the same name and labels.  Summing snapshots is how one engine of several worker processes answers
``/metrics`` for all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

COUNTER, SUMMARY, GAUGE, INFO = "counter", "summary", "gauge", "info"

#: ``(label values, value)`` pairs a gauge reads from live objects when scraped.
GaugeReader = Callable[[], Iterable[tuple[tuple[str, ...], float]]]
#: One family in a snapshot: ``[name, help, kind, label names, [[label values, value], ...]]``;
#: a summary's value is ``[count, sum]``.
Snapshot = list[list[Any]]


class Count:
    """A counter child: a plain integer."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Timing:
    """A summary child: how many durations, and their sum in seconds."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds


class Family:
    """A metric name with its label names and one child per label-value tuple."""

    __slots__ = ("name", "help", "kind", "labels", "children")

    def __init__(self, name: str, help: str, kind: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.kind, self.labels = name, help, kind, labels
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, *values: str) -> Any:
        """The child of ``values`` (created at first use; hot paths keep it)."""
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Timing() if self.kind == SUMMARY else Count()
        return child

    def samples(self) -> list[list[Any]]:
        if self.kind == SUMMARY:
            return [[list(k), [c.count, c.total]] for k, c in self.children.items()]
        return [[list(k), c.value] for k, c in self.children.items()]


class Meters:
    """The families of one part (engine or center) and the gauges read when scraped."""

    def __init__(self) -> None:
        self._families: list[Family] = []
        self._gauges: list[tuple[str, str, tuple[str, ...], GaugeReader, str]] = []

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Family:
        """A counter family; ``name`` without ``_total`` (the text format adds it)."""
        return self._add(Family(name, help, COUNTER, labels))

    def summary(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Family:
        return self._add(Family(name, help, SUMMARY, labels))

    def gauge(self, name: str, help: str, read: GaugeReader, labels: tuple[str, ...] = (),
              kind: str = GAUGE) -> None:
        """A gauge whose samples ``read()`` returns at scrape time (``kind`` INFO: not summed)."""
        self._gauges.append((name, help, labels, read, kind))

    def _add(self, family: Family) -> Family:
        self._families.append(family)
        return family

    def snapshot(self) -> Snapshot:
        """Every family and gauge as plain data, read now."""
        out: Snapshot = [[f.name, f.help, f.kind, list(f.labels), f.samples()] for f in self._families]
        for name, help, labels, read, kind in self._gauges:
            out.append([name, help, kind, list(labels), [[list(k), v] for k, v in read()]])
        return out


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot whose samples are the sums of the samples with the same name and labels
    (``info`` families keep the first value)."""
    order: list[str] = []
    heads: dict[str, list[Any]] = {}
    sums: dict[str, dict[tuple[str, ...], Any]] = {}
    for snapshot in snapshots:
        for name, help, kind, labels, samples in snapshot:
            if name not in heads:
                order.append(name)
                heads[name] = [name, help, kind, labels]
                sums[name] = {}
            table = sums[name]
            for values, value in samples:
                key = tuple(values)
                old = table.get(key)
                if old is None:
                    table[key] = list(value) if kind == SUMMARY else value
                elif kind == SUMMARY:
                    old[0] += value[0]
                    old[1] += value[1]
                elif kind != INFO:
                    table[key] = old + value
    return [[*heads[n], [[list(k), v] for k, v in sums[n].items()]] for n in order]


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, help, kind, labels, samples in self.snapshot:
            family: Any
            if kind == COUNTER:
                family = CounterMetricFamily(name, help, labels=labels)
                for values, value in samples:
                    family.add_metric(values, value)
            elif kind == SUMMARY:
                family = SummaryMetricFamily(name, help, labels=labels)
                for values, (count, total) in samples:
                    family.add_metric(values, count_value=count, sum_value=total)
            else:
                family = GaugeMetricFamily(name, help, labels=labels)
                for values, value in samples:
                    family.add_metric(values, value)
            yield family


def exposition(snapshots: Iterable[Snapshot]) -> bytes:
    """The Prometheus text (format 0.0.4) of the summed ``snapshots``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(merge(snapshots)))
    return generate_latest(registry)
