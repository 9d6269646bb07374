"""Decide, before each step, which sequences decode and which prompt chunks are prefilled.

Every running sequence that has its prompt computed decodes one token; the rest of the step's token
budget goes to prompt chunks (running prompts first, then waiting requests in arrival order), so a long
prompt is cut into chunks interleaved with the decode steps of the others. When the KV cache cannot
hold the next tokens, the youngest running sequence is preempted (its blocks freed) and recomputed
later; nothing is ever allocated past the budget. Hand-written: scheduling is the engine's core.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.engine.kv_cache import PagedKVCache
from kiln.engine.request import Request, RequestStatus
from kiln.errors import InvalidParameterError


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 256  # prompt tokens prefilled per step (the chunk budget)
    max_running: int = 64  # sequences in flight at once
    prefix_caching: bool = True  # reuse cached blocks of a shared prompt prefix

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_running < 1:
            raise InvalidParameterError(
                f"max_batch_tokens={self.max_batch_tokens} and max_running={self.max_running} must be at least 1"
            )


@dataclass
class ScheduledStep:
    decode: list[Request] = field(default_factory=list)  # one token each
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens fed this step)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: PagedKVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission: the last is the youngest

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its cache blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.seq_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _preempt(self, victim: Request, step: ScheduledStep) -> None:
        self.running.remove(victim)
        if victim in step.decode:
            step.decode.remove(victim)
        step.prefill = [(r, n) for r, n in step.prefill if r is not victim]
        self.cache.free(victim.seq_id)
        victim.num_computed = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        step.preempted.append(victim)

    def _reserve_or_preempt(self, request: Request, total: int, step: ScheduledStep) -> bool:
        """Reserve blocks for `total` tokens of `request`, preempting younger sequences; False if it was preempted."""
        while not self.cache.reserve(request.seq_id, total):
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        for request in list(self.running):
            if request not in self.running or request.pending != 1:
                continue
            if self._reserve_or_preempt(request, request.num_computed + 1, step):
                step.decode.append(request)
        budget = self.config.max_batch_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request in self.running and request.pending > 1:
                chunk = min(request.pending, budget)
                if self._reserve_or_preempt(request, request.num_computed + chunk, step):
                    step.prefill.append((request, chunk))
                    budget -= chunk
        while budget > 0 and self.waiting and len(self.running) < self.config.max_running:
            request = self.waiting[0]
            if (request.num_computed == 0 and self.config.prefix_caching and request.seq_id not in self.cache.seqs
                    and request.params.prompt_logprobs is None):
                request.num_computed = self.cache.attach_prefix(request.seq_id, request.tokens)
                request.cached_tokens = max(request.cached_tokens, request.num_computed)
            chunk = min(request.pending, budget)
            if not self.cache.reserve(request.seq_id, request.num_computed + chunk):
                # no room now: it waits for blocks to be freed, holding none meanwhile. Prefix blocks it
                # attached above go back (they stay cached and are attached again next time): two waiting
                # requests that each held some could otherwise wait for each other forever
                self.cache.free(request.seq_id)
                request.num_computed = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.prefill.append((request, chunk))
            budget -= chunk
        return step
