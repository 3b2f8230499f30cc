"""Helpers for the tests of the agent's and the sync's metrics endpoints: scrape and read one sample."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET the Prometheus text at URL; return each sample's value keyed by its name and sorted labels."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode("utf-8")

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    """Return the value of sample NAME with exactly LABELS, or None when the scrape lacks it."""
    return samples.get((name, tuple(sorted(labels.items()))))
