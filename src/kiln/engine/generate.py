"""Generate text for a batch of prompts on kiln's graph: chunked prefill, then one decode step per token.

Each row has its own prompt length, sampling parameters, stop strings and token budget; finished rows
leave the batch. This static batch is what `kiln generate` and `kiln chat` run on; the continuous-
batching engine (requests joining mid-flight, paged cache) builds on the same graph and sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kiln.engine.detokenize import IncrementalDetokenizer
from kiln.engine.sampler import SamplerState, SamplingParams, sample
from kiln.engine.stopping import StopMatcher
from kiln.errors import ContextLengthError, InvalidParameterError
from kiln.model.llama import LlamaModel
from kiln.model.tokenizer import Tokenizer
from kiln.types import FinishReason

TextCallback = Callable[[int, str], None]  # (row, text delta)


@dataclass
class GenerationOutput:
    """One finished sequence and its timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    ttft_ms: float  # start of the call to the first token sampled (prefill of the whole batch)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was sampled

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    budget: int
    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopMatcher
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None
    finished_at: float = 0.0


class Generator:
    """Runs batches of prompts through one model with its tokenizer."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = model.spec.max_position

    def check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise InvalidParameterError("the prompt is empty; pass some text")
        if len(prompt) >= self.context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the model's context is {self.context}; "
                "shorten the prompt"
            )

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: TextCallback | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every prompt (token ids); on_text receives each row's text as it settles."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InvalidParameterError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        for p in prompts:
            self.check_prompt(p)
        rows = [self._new_row(list(p), sp) for p, sp in zip(prompts, plist, strict=True)]
        cache = self.model.new_cache(len(rows), max(len(r.prompt) + r.budget for r in rows))
        start = time.perf_counter()
        logits = self.model.prefill(cache, [r.prompt for r in rows], list(range(len(rows))))
        self._step(rows, list(range(len(rows))), logits, on_text, time.perf_counter())
        first_at = time.perf_counter()
        while active := [i for i, r in enumerate(rows) if r.finish is None]:
            last = torch.tensor([[rows[i].tokens[-1]] for i in active])
            logits = self.model(last, cache, rows=active)
            self._step(rows, active, logits, on_text, time.perf_counter())
        prefill_s = first_at - start
        return [self._output(r, prefill_s, first_at) for r in rows]

    def _new_row(self, prompt: list[int], params: SamplingParams) -> _Row:
        return _Row(
            prompt=prompt,
            params=params,
            budget=min(params.max_tokens, self.context - len(prompt)),
            sampler=SamplerState(params, prompt, self.model.spec.vocab_size),
            detok=IncrementalDetokenizer(self.tokenizer, prompt),
            stops=StopMatcher(params.stop),
        )

    def _step(
        self, rows: list[_Row], active: list[int], logits: torch.Tensor, on_text: TextCallback | None,
        now: float,
    ) -> None:
        """Sample one token for each active row and settle its text, stop strings and budget."""
        tokens = sample(logits, [rows[i].sampler for i in active])
        for i, tok in zip(active, tokens, strict=True):
            row = rows[i]
            if tok in self.tokenizer.eos_token_ids and not row.params.ignore_eos:
                self._finish(i, row, "stop", now, on_text)
                continue
            row.tokens.append(tok)
            row.token_times.append(now)
            released, stopped = row.stops.feed(row.detok.push(tok))
            self._emit(i, row, released, on_text)
            if stopped:
                self._finish(i, row, "stop", now, on_text, flush=False)
            elif len(row.tokens) >= row.budget:
                self._finish(i, row, "length", now, on_text)

    def _emit(self, i: int, row: _Row, text: str, on_text: TextCallback | None) -> None:
        if text:
            row.text += text
            if on_text is not None:
                on_text(i, text)

    def _finish(
        self, i: int, row: _Row, reason: FinishReason, now: float, on_text: TextCallback | None,
        flush: bool = True,
    ) -> None:
        if flush:
            tail, stopped = row.stops.feed(row.detok.flush())
            self._emit(i, row, tail if stopped else tail + row.stops.flush(), on_text)
            reason = "stop" if stopped else reason
        row.finish = reason
        row.finished_at = now

    def _output(self, row: _Row, prefill_s: float, first_at: float) -> GenerationOutput:
        assert row.finish is not None
        decode_s = row.finished_at - first_at
        later = len(row.tokens) - 1
        return GenerationOutput(
            text=row.text,
            token_ids=row.tokens,
            prompt_tokens=len(row.prompt),
            finish_reason=row.finish,
            ttft_ms=prefill_s * 1000,
            prefill_tokens_per_s=len(row.prompt) / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=later / decode_s if later > 0 and decode_s > 0 else 0.0,
            token_times=row.token_times,
        )
