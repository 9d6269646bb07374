"""Perplexity with llama.cpp's protocol, and its KL-divergence statistics against a baseline model.

As `llama-perplexity`: the whole file is tokenized once (BOS first if the tokenizer adds one), cut
into non-overlapping chunks of ctx tokens (the first token of each replaced by BOS when the tokenizer
adds one), and only the second half of each chunk is scored, so every scored token has at least
ctx/2 tokens of context. PPL's error and the KLD/Δppl statistics use the same formulas as its report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kiln.model.llama import LlamaModel


@dataclass
class Sums:
    """Running sums over scored tokens; enough to finish every statistic at the end (or resume)."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    nll_base: float = 0.0
    nll_base2: float = 0.0
    nll_nll_base: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    same_top: int = 0
    kld_values: list[float] = field(default_factory=list)

    def add(self, other: Sums) -> None:
        for name in ("count", "nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "same_top"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.kld_values += other.kld_values

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sums:
        return cls(**data)


def chunks(tokens: Sequence[int], ctx: int, bos: int | None, limit_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping ctx-token chunks of the tokenized file, each starting with BOS if given."""
    n = len(tokens) // ctx
    if limit_tokens is not None:
        n = min(n, max(1, limit_tokens // ctx))
    out = [list(tokens[i * ctx : (i + 1) * ctx]) for i in range(n)]
    if bos is not None:
        for c in out:
            c[0] = bos
    return out


def _logprobs(model: LlamaModel, batch: Tensor, first: int) -> Tensor:
    """Log-softmax [B, ctx - 1 - first, V] at positions first .. ctx-2 (each predicts the next token)."""
    hidden, _ = model.hidden_states(batch)
    return torch.log_softmax(model.lm_head(hidden[:, first:-1]).float(), dim=-1)


@torch.inference_mode()
def score_chunks(model: LlamaModel, batch_chunks: list[list[int]], baseline: LlamaModel | None = None) -> list[Sums]:
    """Score the second half of each chunk (one Sums per chunk); with a baseline, also the KL divergence."""
    batch = torch.tensor(batch_chunks)
    ctx = batch.shape[1]
    first = ctx // 2
    targets = batch[:, first + 1 :].unsqueeze(-1)  # [B, n, 1]
    logp = _logprobs(model, batch, first)
    nll = -logp.gather(-1, targets).squeeze(-1).double()  # [B, n]
    if baseline is not None:
        base = _logprobs(baseline, batch, first)
        nll_base = -base.gather(-1, targets).squeeze(-1).double()
        kld = (base.exp() * (base - logp)).sum(-1).double()  # KL(base || model) per position
        same_top = base.argmax(-1) == logp.argmax(-1)
    out = []
    for i in range(batch.shape[0]):
        s = sums_of(nll[i])
        if baseline is not None:
            s.nll_base, s.nll_base2 = float(nll_base[i].sum()), float((nll_base[i] ** 2).sum())
            s.nll_nll_base = float((nll[i] * nll_base[i]).sum())
            s.kld, s.kld2 = float(kld[i].sum()), float((kld[i] ** 2).sum())
            s.same_top = int(same_top[i].sum())
            s.kld_values = [round(float(v), 7) for v in kld[i]]
        out.append(s)
    return out


def sums_of(nll: Tensor) -> Sums:
    """The sums of one chunk's scored tokens from their negative log-likelihoods [n] (float64)."""
    return Sums(count=nll.shape[0], nll=float(nll.sum()), nll2=float((nll**2).sum()))


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float | None]:
    """Mean and its standard error; the error is None (undefined, not 0) for 10 values or fewer, as llama.cpp
    estimates none there: a one-chunk run at --ctx 16 (7 tokens) printed ppl ± 0.0000."""
    if count < 1:
        return math.nan, None
    mean = total / count
    if count <= 10:
        return mean, None
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 else 0.0


def _times(scale: float, stderr: float | None) -> float | None:
    return None if stderr is None else scale * stderr


def statistics(s: Sums) -> dict[str, float | None]:
    """ppl ± stderr, and with a baseline: mean KLD ± se, its median and 99th percentile, top-1 agreement,
    ppl of the baseline and Δppl ± se (llama.cpp's covariance-corrected error)."""
    log_ppl, log_ppl_se = _mean_and_uncertainty(s.nll, s.nll2, s.count)
    ppl = math.exp(log_ppl)
    out: dict[str, float | None] = {"ppl": ppl, "ppl_stderr": _times(ppl, log_ppl_se), "tokens_scored": float(s.count)}
    if not s.kld_values:
        return out
    log_base, log_base_se = _mean_and_uncertainty(s.nll_base, s.nll_base2, s.count)
    ppl_base = math.exp(log_base)
    cov = (s.nll_nll_base / s.count - (s.nll / s.count) * (s.nll_base / s.count)) / (s.count - 1)
    ppl_cov = ppl * ppl_base * cov
    kld, kld_se = _mean_and_uncertainty(s.kld, s.kld2, s.count)
    top = s.same_top / s.count
    values = sorted(s.kld_values)
    out.update(
        ppl_base=ppl_base,
        ppl_base_stderr=_times(ppl_base, log_base_se),
        delta_ppl=ppl - ppl_base,
        delta_ppl_stderr=None if log_ppl_se is None or log_base_se is None else
        math.sqrt(max(0.0, (ppl * log_ppl_se) ** 2 + (ppl_base * log_base_se) ** 2 - 2 * ppl_cov)),
        delta_ppl_pct=100 * (ppl / ppl_base - 1),
        kld=kld,
        kld_stderr=kld_se,
        kld_median=_percentile(values, 0.5),
        kld_p99=_percentile(values, 0.99),
        same_top1=top,
        same_top1_stderr=math.sqrt(top * (1 - top) / (s.count - 1)),
    )
    return out


def _percentile(values: Sequence[float], fraction: float) -> float:
    position = fraction * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (position - low) * (values[high] - values[low])
