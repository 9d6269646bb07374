"""One generation request and its life: waiting, running, preempted, finished (as vLLM's request states).

The request owns everything that is per sequence: its tokens, sampling state, streaming detokenizer,
stop-string matcher and timings. `num_computed` counts the tokens whose keys and values are in the
KV cache; the tokens after it are what the next forward passes feed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal

from kiln.engine.detokenize import IncrementalDetokenizer
from kiln.engine.sampler import SamplerState, SamplingParams
from kiln.engine.stopping import StopMatcher
from kiln.errors import KilnError

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before penalties and temperature)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probabilities


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # its cache was freed to make room; it waits to be recomputed
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    request_id: str
    seq_id: int  # the KV cache's key for this request
    prompt: list[int]
    params: SamplingParams
    budget: int  # tokens it may generate (max_tokens clipped to the context)
    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopMatcher
    arrival: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    output: list[int] = field(default_factory=list)
    text: str = ""
    num_computed: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    num_preemptions: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, when params.logprobs is set
    # per prompt token when params.prompt_logprobs is set (None for the first, which nothing predicts)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    error: KilnError | None = None  # why the engine ended this request alone (status FINISHED_ABORTED)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_range(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a long prompt is copied once per step otherwise)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p : end - p]
        return self.prompt[start:end] + self.output[: max(0, end - p)]

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the prompt's rest while prefilling, 1 while decoding."""
        return len(self.prompt) + len(self.output) - self.num_computed

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)

    def finish(self, status: RequestStatus, now: float) -> None:
        self.status = status
        self.finished_at = now
