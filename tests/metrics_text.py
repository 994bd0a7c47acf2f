"""The service's Prometheus text exposition (/metrics), parsed for the tests.

Several test modules read counters and gauges off /metrics. They share this one parser, so that
every test keys samples the same way and reads them with the same `value` (one exact series)
and `total` (summed over the series that carry some labels). Test modules import it as
`metrics_text`: pytest puts `tests/` on sys.path (`pythonpath` in pyproject.toml), since with
`--import-mode=importlib` a test module cannot import its conftest or a sibling module."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

# (sample name, its labels) -> value; names keep their suffix (_total, _bucket, _count, ...)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, parsed with prometheus_client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """The samples of `{url}/metrics`, `url` being a running server's base URL."""
    return parse(httpx.get(f"{url}/metrics", timeout=timeout).text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` whose labels are exactly `labels`, or None when there is none."""
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0.0 when there are none)."""
    wanted = set(labels.items())
    return sum(
        (number for (sample, have), number in samples.items() if sample == name and wanted <= have),
        0.0,
    )
