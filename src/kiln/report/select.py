"""Which recorded model to serve: the budget a deployment has, and the model that meets it.

Compressors tune one method's settings and engines size their own memory at start-up; none of them answers
"of these artifacts, which one do I serve on this box?". kiln has every candidate's quality and cost in the
runs database (`kiln eval`, `kiln bench`), so it can: a model qualifies when its wikitext2 perplexity is
within the allowed increase over the reference and it meets every resource limit given; of those, kiln
picks the least quality loss when a resource limit was set (the limit is what the deployment must meet,
quality is what it wants most of), else the smallest (with no limit, smaller is the point of compressing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kiln.errors import InvalidParameterError
from kiln.report.collect import ModelSummary, collect, reference_of


@dataclass(frozen=True)
class Budget:
    max_ppl_increase_pct: float = 2.0
    max_memory_mb: float | None = None  # peak RSS while `kiln bench` generated (any batch size it ran)
    min_tokens_per_s: float | None = None  # batch-1 decode, per sequence
    max_ttft_ms: float | None = None  # batch-1 time to first token

    def __post_init__(self) -> None:
        # NaN passed both comparisons, and a NaN limit let every model through ("within +nan%")
        for name in ("max_memory_mb", "min_tokens_per_s", "max_ttft_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidParameterError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
        if not self.max_ppl_increase_pct >= 0:
            raise InvalidParameterError(
                f"--max-ppl-increase must be 0 or more (percent), got {self.max_ppl_increase_pct:g}")

    @property
    def limits_resources(self) -> bool:
        return any(v is not None for v in (self.max_memory_mb, self.min_tokens_per_s, self.max_ttft_ms))

    def describe(self) -> str:
        parts = [f"perplexity within +{self.max_ppl_increase_pct:g}% of the reference"]
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:g} MB")
        if self.min_tokens_per_s is not None:
            parts.append(f"batch-1 decode >= {self.min_tokens_per_s:g} tok/s")
        if self.max_ttft_ms is not None:
            parts.append(f"time to first token <= {self.max_ttft_ms:g} ms")
        return ", ".join(parts)


@dataclass
class Choice:
    budget: Budget
    reference: str | None
    chosen: str | None = None
    reason: str = ""
    rejected: dict[str, str] = field(default_factory=dict)  # model -> why it does not qualify

    def as_dict(self) -> dict[str, object]:
        return {"budget": self.budget.describe(), "reference": self.reference, "chosen": self.chosen,
                "reason": self.reason, "rejected": self.rejected}


def _resource_checks(budget: Budget) -> list[tuple[str, Callable[[ModelSummary], float | None], float, bool, str]]:
    """(what, how to read it, limit, higher is better, unit) for each resource limit set."""
    checks: list[tuple[str, Callable[[ModelSummary], float | None], float, bool, str]] = []
    if budget.max_memory_mb is not None:
        checks.append(("memory", _memory_mb, budget.max_memory_mb, False, "MB"))
    if budget.min_tokens_per_s is not None:
        checks.append(("batch-1 decode", lambda m: m.bench_at(1, "decode_tokens_per_s"),
                       budget.min_tokens_per_s, True, "tok/s"))
    if budget.max_ttft_ms is not None:
        checks.append(("time to first token", lambda m: m.bench_at(1, "ttft_ms"), budget.max_ttft_ms, False, "ms"))
    return checks


def _memory_mb(m: ModelSummary) -> float | None:
    value = m.memory_for_budget[1]
    return None if value is None else value / 1e6


def _why_not(m: ModelSummary, ref_ppl: float, budget: Budget) -> str | None:
    ppl = m.metric("wikitext2", "ppl")
    if ppl is None:
        return "no wikitext2 perplexity recorded (run `kiln eval --task wikitext2` on it)"
    if math.isnan(ppl):  # NaN passed the comparison below, so a model with NaN outputs met every budget
        return "wikitext2 perplexity is NaN (the model's log-probabilities were not numbers)"
    increase = 100 * (ppl / ref_ppl - 1)
    if increase > budget.max_ppl_increase_pct:
        return f"perplexity {increase:+.2f}% > +{budget.max_ppl_increase_pct:g}%"
    for what, read, limit, higher_is_better, unit in _resource_checks(budget):
        value = read(m)
        if value is None:
            return f"no {what} recorded (run `kiln bench` on it with batch size 1)"
        if (value < limit) if higher_is_better else (value > limit):
            what = m.memory_for_budget[0] if what == "memory" else what  # which peak it was
            return f"{what} {value:,.1f} {unit} {'<' if higher_is_better else '>'} {limit:g} {unit}"
    return None


def choose(models: Sequence[str] | None = None, reference: str | None = None,
           budget: Budget | None = None, found: list[ModelSummary] | None = None) -> Choice:
    """The model to serve among the recorded ones (`models` filters as in `kiln report`; `found`: the
    summaries already collected), with every other model's reason for not qualifying."""
    budget = budget or Budget()
    if found is None:
        found = collect(list(models) if models else None)
    ref = reference_of(found, reference)
    choice = Choice(budget, ref.name if ref else None)
    ref_ppl = ref.metric("wikitext2", "ppl") if ref else None
    if not ref_ppl:
        choice.reason = "the reference has no wikitext2 perplexity recorded; run `kiln eval --task wikitext2` on it"
        return choice
    if not math.isfinite(ref_ppl):  # every increase over it is NaN (or 0 / inf), which met the budget
        choice.reason = (f"the reference {choice.reference} has a wikitext2 perplexity of {ref_ppl}, which "
                         "nothing can be measured against; pass another model as --reference")
        return choice
    ok = []
    for m in found:
        why = _why_not(m, ref_ppl, budget)
        if why is None:
            ok.append(m)
        else:
            choice.rejected[m.name] = why
    if not ok:
        choice.reason = f"no recorded model meets the budget ({budget.describe()})"
        return choice
    in_memory = all(m.bytes_in_memory is not None for m in ok)

    def size_of(m: ModelSummary) -> int:
        # in memory where every candidate was benched: that is what serving it costs, and a file on disk
        # can be far smaller than the model it loads as (the default model: a 98 MB Q4_1 GGUF that runs
        # as 538 MB of fp32)
        return (m.bytes_in_memory if in_memory else m.size_bytes) or 0

    def ppl_of(m: ModelSummary) -> float:
        return m.metric("wikitext2", "ppl") or ref_ppl

    if budget.limits_resources:
        best = min(ok, key=lambda m: (ppl_of(m), size_of(m)))
        why = "least perplexity"
    else:
        best = min(ok, key=size_of)
        why = f"smallest {'in memory' if in_memory else 'on disk'}"
    choice.chosen = best.name
    choice.reason = (f"{why} of {len(ok)} meeting the budget ({budget.describe()}): "
                     f"{100 * (ppl_of(best) / ref_ppl - 1):+.2f}% perplexity, {size_of(best) / 1e6:.0f} MB "
                     f"{'in memory' if in_memory else 'on disk'}")
    return choice
