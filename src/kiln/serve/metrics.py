"""Prometheus metrics of the server, in a registry of its own (prometheus-client)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from kiln.engine.drafting import SpeculationStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.generations = Counter("kiln_generations_total", "finished generations by model, version and reason",
                                   ["model", "version", "finish_reason"], registry=r)
        self.tokens_in = Counter("kiln_prompt_tokens_total", "prompt tokens", ["model", "version"], registry=r)
        self.tokens_out = Counter("kiln_generation_tokens_total", "generated tokens", ["model", "version"], registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "time to first token", ["model", "version"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kiln_time_per_output_token_seconds", "time per output token after the first",
                              ["model", "version"], buckets=PER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_request_duration_seconds", "end-to-end generation time", ["model", "version"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("kiln_queue_depth", "requests waiting for the engine", ["model", "version"],
                                 registry=r)
        self.running = Gauge("kiln_running_sequences", "sequences in the running batch", ["model", "version"],
                             registry=r)
        self.kv_usage = Gauge("kiln_kv_cache_usage_ratio", "fraction of KV-cache blocks in use", ["model", "version"],
                              registry=r)
        self.rejections = Counter("kiln_rejections_total", "requests refused before running", ["reason"], registry=r)
        self.disconnects = Counter("kiln_client_disconnects_total", "requests cancelled by the client going away",
                                   registry=r)
        self.timeouts = Counter("kiln_timeouts_total", "requests cancelled at their deadline", registry=r)
        self.guardrail_blocks = Counter("kiln_guardrail_blocks_total", "requests or responses blocked by a guardrail",
                                        ["model", "direction", "kind"], registry=r)
        # speculative decoding (--draft), as vLLM's spec_decode counters: acceptance = accepted / draft tokens
        self.draft_tokens = Counter("kiln_spec_decode_draft_tokens_total", "tokens the draft model proposed",
                                    ["model", "version"], registry=r)
        self.accepted_tokens = Counter("kiln_spec_decode_accepted_tokens_total", "proposed tokens the model kept",
                                       ["model", "version"], registry=r)
        # labels -> (the engine's stats object, its totals at the last scrape): a version deployed again
        # (a rollback, a canary sent traffic again) brings a new engine whose totals start over from 0
        self._speculation_seen: dict[tuple[str, str], tuple[SpeculationStats, int, int]] = {}

    def count_speculation(self, labels: tuple[str, str], stats: SpeculationStats) -> None:
        """Bring the speculative-decoding counters up to an engine's running totals (its drafter's stats, read at
        each scrape); an engine that replaced one under the same labels counts from 0."""
        seen = self._speculation_seen.get(labels)
        base = (seen[1], seen[2]) if seen is not None and seen[0] is stats else (0, 0)
        self.draft_tokens.labels(*labels).inc(max(0, stats.proposed - base[0]))
        self.accepted_tokens.labels(*labels).inc(max(0, stats.accepted - base[1]))
        self._speculation_seen[labels] = (stats, stats.proposed, stats.accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
