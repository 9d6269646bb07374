"""Generate text for a batch of prompts through the engine, and report each sequence's timings.

What `kiln generate`, `kiln chat`, `kiln bench` and generation tasks call: every prompt becomes an
engine request; text is streamed per row through `on_text` as it settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.kv_cache import PagedKVCache
from kiln.engine.request import FinishReason, Request
from kiln.engine.sampler import SamplingParams
from kiln.errors import InvalidParameterError
from kiln.model.llama import LlamaModel
from kiln.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kiln.engine.drafting import Drafter
    from kiln.engine.onnx_runtime import OnnxModel

TextCallback = Callable[[int, str], None]  # (row, text delta)
MIN_BUDGET_BYTES = 64 << 20


@dataclass
class GenerationOutput:
    """One finished sequence and its timings."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    ttft_ms: float  # start of the call to this sequence's first token
    prefill_tokens_per_s: float  # prompt tokens over the time to first token
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was sampled
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    """Runs batches of prompts through one model; keeps its engine (and prefix cache) between calls."""

    def __init__(self, model: LlamaModel | OnnxModel, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 kv_cache: str = "model", prefix_caching: bool = True, drafter: Drafter | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.kv_cache = kv_cache  # used when no config fixes it
        self.prefix_caching = prefix_caching  # off for benchmarks: a repeated prompt must be computed again
        self.drafter = drafter  # speculative decoding (kiln generate --draft): the engine drafts batch-1 greedy rows
        self.context = model.spec.max_position
        self.engine: Engine | None = None

    def _engine_for(self, prompts: Sequence[Sequence[int]], plist: Sequence[SamplingParams]) -> Engine:
        """An engine whose KV budget holds every sequence at full length (unless a config fixes it)."""
        if self.config is not None:
            self.engine = self.engine or Engine(self.model, self.tokenizer, self.config, self.drafter)
            return self.engine
        block = EngineConfig.block_size
        lengths = [min(len(p) + sp.max_tokens, self.context) for p, sp in zip(prompts, plist, strict=True)]
        blocks = sum(-(-n // block) + 2 for n in lengths)  # each sequence's blocks, and two to spare
        if self.engine is None or self.engine.cache.capacity_tokens < blocks * block:
            self.engine = None  # free the old pool before the new one is allocated
            per_token = PagedKVCache.bytes_per_token(self.model.spec, self.model.dtype, self.kv_cache == "int8")
            budget = max(MIN_BUDGET_BYTES, (blocks + 1) * block * per_token)  # + the scratch block
            self.engine = Engine(self.model, self.tokenizer, EngineConfig(
                kv_budget_bytes=budget, max_running=max(64, len(prompts)), kv_cache=self.kv_cache,
                prefix_caching=self.prefix_caching), self.drafter)
        return self.engine

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
        engine = self._engine_for(prompts, plist)
        start = time.perf_counter()
        requests: list[Request] = []
        try:
            # added inside the try: a prompt refused after others were queued takes them out again (the engine is
            # kept, and they would run with the next call)
            for p, sp in zip(prompts, plist, strict=True):
                requests.append(engine.add_request(p, sp))
            row_of = {r.request_id: i for i, r in enumerate(requests)}
            while any(not r.status.finished for r in requests):
                for out in engine.step():
                    if on_text is not None and out.text and out.request.request_id in row_of:
                        on_text(row_of[out.request.request_id], out.text)
        except BaseException:
            for r in requests:
                engine.abort(r.request_id)
            raise
        return [self._output(r, start) for r in requests]

    @staticmethod
    def _output(r: Request, start: float) -> GenerationOutput:
        first = r.first_token_at or time.perf_counter()
        ttft = first - start
        later = len(r.output) - 1
        decode_s = (r.finished_at or first) - first
        return GenerationOutput(
            text=r.text,
            token_ids=list(r.output),
            prompt_tokens=len(r.prompt),
            finish_reason=r.finish_reason or "stop",
            ttft_ms=ttft * 1000,
            prefill_tokens_per_s=len(r.prompt) / ttft if ttft > 0 else 0.0,
            decode_tokens_per_s=later / decode_s if later > 0 and decode_s > 0 else 0.0,
            token_times=list(r.token_times),
            cached_tokens=r.cached_tokens,
        )
