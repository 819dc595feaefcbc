"""Reading ``GET /metrics`` back: the exposition parsed by the client library's own parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Scrape:
    """One scrape: its text, and every sample by name and labels."""

    text: str
    content_type: str
    samples: dict[SampleKey, float]
    families: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled child that has not been created yet."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))


def parse(text: str, content_type: str = "") -> Scrape:
    samples: dict[SampleKey, float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(text, content_type, samples, frozenset(families))


async def scrape(app: Any) -> Scrape:
    """``GET /metrics`` as a scraper sends it: no caller token."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as anonymous:
        response = await anonymous.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text, response.headers["content-type"])
