"""Reading a Prometheus exposition scraped from the daemon."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support.http import run_curl

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(sock: Path, *headers: str) -> tuple[str, str]:
    """(Content-Type, body) of GET /v1/metrics through curl on the socket."""
    extra = [arg for header in headers for arg in ("-H", header)]
    done = run_curl(
        "--unix-socket", str(sock), "-w", "\n%{content_type}", *extra, "http://sugard/v1/metrics"
    )
    assert 0 == done.returncode, done.stderr
    body, _, content_type = done.stdout.rpartition("\n")
    return content_type, body


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def with_name(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}
