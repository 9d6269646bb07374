"""The speculative-decoding counters follow each engine's running totals."""

from __future__ import annotations

from kiln.engine.drafting import SpeculationStats
from kiln.serve.metrics import Metrics


def counted(metrics: Metrics) -> tuple[float, float]:
    labels = ("m", "v1")
    return (metrics.draft_tokens.labels(*labels)._value.get(), metrics.accepted_tokens.labels(*labels)._value.get())


def test_a_version_deployed_again_counts_on_from_its_new_engine() -> None:
    """A rollback or a renewed canary starts a new engine for a version served before: its totals start
    at 0 under the same labels, and a scrape must neither fail nor lose them."""
    metrics = Metrics()
    first, second = SpeculationStats(proposed=10, accepted=6), SpeculationStats(proposed=3, accepted=1)
    metrics.count_speculation(("m", "v1"), first)
    metrics.count_speculation(("m", "v1"), first)  # a second scrape adds nothing
    assert counted(metrics) == (10, 6)
    metrics.count_speculation(("m", "v1"), second)
    assert counted(metrics) == (13, 7)
    second.proposed, second.accepted = 20, 9
    metrics.count_speculation(("m", "v1"), second)
    assert counted(metrics) == (30, 15)
