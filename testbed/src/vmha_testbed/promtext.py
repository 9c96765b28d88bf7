"""Prometheus' text format as the tests, the demo and the benchmarks read it: the samples of
a scrape, and one sample's value."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]
"""A sample's name (with its suffix, e.g. `_total`), its labels and its value."""


def parse_samples(text: str) -> list[Sample]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def sample_value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the first sample named `name` whose labels include `labels`; None when
    there is none."""
    wanted = labels.items()
    for sample_name, sample_labels, value in samples:
        if sample_name == name and wanted <= sample_labels.items():
            return value
    return None


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """`sample_value` of a scrape's text."""
    return sample_value(parse_samples(text), name, **labels)
