"""Reading a meter as a scrape would: its Prometheus text and single samples (for tests)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from connmix_tx.tally import exposition


def metrics_text(meter: Any) -> str:
    """What ``GET /metrics`` would answer for ``meter`` (an ``EngineMeter`` or ``CenterMeter``)."""
    return exposition([meter.snapshot()]).decode()


def sample_value(meter: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of the sample ``name`` (as in the text: ``…_total``) with exactly ``labels``,
    or None when there is none (as prometheus_client's ``get_sample_value``)."""
    wanted = labels or {}
    for family in text_string_to_metric_families(metrics_text(meter)):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return float(sample.value)
    return None
