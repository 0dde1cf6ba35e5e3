"""A running node's /metrics (--metrics_port), parsed."""

from __future__ import annotations

import time
import urllib.request


def scrape(port: int) -> dict:
    """{(sample name, sorted labels): value} of the node's /metrics, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def scrape_until(port: int, what: str, predicate, timeout: float = 15.0) -> dict:
    """Scrape until `predicate(samples)` holds: counts arrive with the actors' next heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {sorted(samples.items())}")
        time.sleep(0.3)
