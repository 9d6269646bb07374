"""The continuous-batching engine: requests in, token streams out.

`step()` is the loop body, in three calls as vLLM's: schedule (which sequences run), execute (one forward
pass for the decoding sequences, one for the prompt chunks), update (sample, detokenize, stop, finish,
free). Requests can join or be cancelled between any two steps; a cancelled request's cache blocks are
freed at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.engine.detokenize import IncrementalDetokenizer
from kiln.engine.kv_cache import PagedKVCache
from kiln.engine.request import Request, RequestStatus, TokenLogprob
from kiln.engine.sampler import Logits, SamplerState, SamplingParams, sample
from kiln.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from kiln.engine.stopping import StopMatcher
from kiln.errors import ContextLengthError, InvalidParameterError
from kiln.model.llama import LlamaModel
from kiln.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kiln.engine.drafting import Drafter
    from kiln.engine.grammar import Constraint
    from kiln.engine.onnx_runtime import OnnxModel

KV_CACHE_TYPES = ("model", "int8")


def padded_width(width: int) -> int:
    """A prompt chunk's width rounded up to one of a few sizes (16s to 64, 32s to 256, then 64s).

    oneDNN, behind torch's bf16 and int8 matmuls, compiles and caches a kernel for every input shape it
    meets. With chunk widths free to take any value, a serving process kept meeting new shapes and its
    memory grew for as long as it ran; a few padded widths keep the set of shapes, and the caches, small.
    The padding columns write to the KV cache's scratch block and cost a little compute.
    """
    if width <= 1:
        return width
    step = 16 if width <= 64 else 32 if width <= 256 else 64
    return -(-width // step) * step


@dataclass(frozen=True)
class EngineConfig:
    """How much memory the KV cache may use and how work is batched."""

    kv_budget_bytes: int = 1 << 30  # the paged KV cache's pool
    block_size: int = 16  # tokens per KV block
    max_batch_tokens: int = 256  # prompt tokens prefilled per step
    max_running: int = 64  # sequences in flight at once
    prefix_caching: bool = True
    kv_cache: str = "model"  # model: the model's dtype | int8: int8 values with a scale per token and head

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_budget_bytes < 1:
            raise InvalidParameterError("block_size and kv_budget_bytes must be positive")
        if self.kv_cache not in KV_CACHE_TYPES:
            raise InvalidParameterError(f"--kv-cache {self.kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")


@dataclass
class StepOutput:
    request: Request
    tokens: list[int]  # tokens sampled in this step (0 or 1)
    text: str  # text released in this step
    finished: bool


def token_logprob(logits: Logits, token: int, top: int) -> TokenLogprob:
    """log-softmax of one row of logits [V]: the token's value and the `top` best alternatives."""
    return tokens_logprobs(torch.as_tensor(logits).unsqueeze(0), [token], top)[0]


def tokens_logprobs(logits: Logits, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """token_logprob of each row of logits [n, V] with its own token: one log-softmax over all rows."""
    logprobs = torch.log_softmax(torch.as_tensor(logits[: len(tokens)]).float(), dim=-1)
    targets = torch.tensor(list(tokens))
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    out = []
    for i, token in enumerate(targets.tolist()):
        pairs = tuple(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best else ()
        out.append(TokenLogprob(token, picked[i], pairs))
    return out


# The target checks k drafts in one pass, whose keys and values differ from one-token steps' in the last bits;
# rounded to int8 such a difference can become a whole step of the grid, and greedy choices differed from plain
# decoding's (1 of 5 replies of the default model within 64 tokens, with an int4 artifact drafting).
DRAFT_WITH_INT8_KV = ("--draft does not run with --kv-cache int8: the checked tokens would differ from plain "
                      "decoding's; drop one of them")


class Engine:
    def __init__(self, model: LlamaModel | OnnxModel, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 drafter: Drafter | None = None) -> None:
        if drafter is not None and config is not None and config.kv_cache == "int8":
            raise InvalidParameterError(DRAFT_WITH_INT8_KV)
        self.model = model
        self.drafter = drafter  # speculative decoding while one sequence decodes alone
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        # a runtime that keeps its own keys and values (ONNX Runtime) leaves the cache only the accounting
        owns_kv = getattr(model, "owns_kv", False)
        self.cache = PagedKVCache(model.spec, self.config.kv_budget_bytes, model.dtype, self.config.block_size,
                                  int8=self.config.kv_cache == "int8", store=not owns_kv)
        if owns_kv:
            self.cache.on_free = model.forget  # type: ignore[union-attr,assignment]
        # a runtime with its own keys and values shares prefixes only if it can copy blocks in and out
        self.shares_prefixes = self.config.prefix_caching and (not owns_kv or getattr(model, "shares_prefixes", False))
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_batch_tokens, self.config.max_running, self.shares_prefixes),
            self.cache,
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count(1)
        self.context = model.spec.max_position

    # --- requests in -------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Queue a prompt (token ids); raises a one-line error if it cannot ever run."""
        if not prompt:
            raise InvalidParameterError("the prompt is empty; pass some text")
        if len(prompt) >= self.context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the model's context is {self.context}; shorten the prompt"
            )
        if len(prompt) + 1 > self.cache.capacity_tokens:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the KV cache budget holds {self.cache.capacity_tokens}; "
                "raise the KV budget or shorten the prompt"
            )
        seq_id = next(self._seq_ids)
        request = Request(
            request_id=request_id or f"req-{seq_id}", seq_id=seq_id, prompt=list(prompt), params=params,
            budget=min(params.max_tokens, self.context - len(prompt)),
            sampler=SamplerState(params, prompt, self.model.spec.vocab_size, self._constraint(params),
                                 self.tokenizer.eos_token_ids),
            detok=IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens),
            stops=StopMatcher(params.stop),
        )
        if request.request_id in self.requests:
            raise InvalidParameterError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request

    def _constraint(self, params: SamplingParams) -> Constraint | None:
        """The grammar state for a request with params.grammar (None without one)."""
        if params.grammar is None:
            return None
        from kiln.engine.grammar import Constraint, ll_tokenizer

        return Constraint(params.grammar, ll_tokenizer(self.tokenizer, self.model.spec.vocab_size))

    def abort(self, request_id: str) -> bool:
        """Cancel a queued or running request and free its cache now; False if it is unknown or done.

        A request still listed here is taken out of the queues and its blocks freed even if it is marked finished:
        an interruption (Ctrl-C) between _finish marking it and removing it would otherwise leave it running, its
        blocks held, in an engine that is kept for later requests."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.remove(request)
        if self.drafter is not None:
            self.drafter.forget(request.seq_id)
        if request.status.finished:
            return False
        request.finish(RequestStatus.FINISHED_ABORTED, time.perf_counter())
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # --- the loop body -----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        if isinstance(self.model, LlamaModel):
            with torch.inference_mode():
                return self._step()
        # the onnxruntime runtime's step touches no torch (see _forward)
        return self._step()

    def _step(self) -> list[StepOutput]:
        outputs = self._finish_overlong()
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            return outputs
        if scheduled.decode:
            speculated = self._speculate(scheduled.decode[0]) if self._speculates(scheduled) else None
            if speculated is not None:
                outputs += speculated
            else:
                logits = self._forward([(r, 1) for r in scheduled.decode])
                outputs += self._update(scheduled.decode, logits)
        plain = [(r, n) for r, n in scheduled.prefill if r.params.prompt_logprobs is None]
        if plain:
            logits = self._forward(plain)
            outputs += self._prefilled(plain, logits)
        for r, n in scheduled.prefill:  # each alone, after the others' logits are read (a view at batch 1)
            if r.params.prompt_logprobs is not None:
                outputs += self._prefilled([(r, n)], self._prefill_scored(r, n)[n - 1 : n])
        return outputs

    def _prefilled(self, items: list[tuple[Request, int]], logits: Logits) -> list[StepOutput]:
        """After prompt chunks ran (logits after each one's last token): publish whole prompts for prefix
        caching, before a request that finishes at once frees its blocks, and sample where a prompt is done."""
        for r, _ in items:
            if r.num_computed >= len(r.prompt) and self.shares_prefixes:
                published = len(self.cache.seqs[r.seq_id].hashes)
                self.cache.register_prefix(r.seq_id, r.prompt)
                if not isinstance(self.model, LlamaModel):
                    try:
                        self.model.publish(r.seq_id, self.cache)
                    except BaseException:  # Ctrl-C or a failure mid-copy: blocks that are not in the store go
                        # unfindable again; found, they failed every later prompt with the same start
                        self.cache.withdraw_prefix(r.seq_id, published)
                        raise
        done = [i for i, (r, _) in enumerate(items) if r.pending == 0]
        return self._update([items[i][0] for i in done], logits[done]) if done else []

    def _prefill_scored(self, r: Request, n: int) -> Logits:
        """A prompt chunk of a request that asked for prompt logprobs, run alone with the logits of each of
        its n positions kept ([n, V]); those that predict a prompt token become its log-probabilities."""
        start = r.num_computed
        every = self._forward([(r, n)], every=True)
        if start == 0:  # from the beginning (again, after a preemption): nothing predicts the first token
            r.prompt_logprobs = [None]
        targets = r.prompt[start + 1 : start + n + 1]  # what positions start .. start + n - 1 predict
        assert r.params.prompt_logprobs is not None
        if targets:
            r.prompt_logprobs += tokens_logprobs(every, targets, r.params.prompt_logprobs)
        return every

    def _speculates(self, scheduled: ScheduledStep) -> bool:
        """Whether this step drafts: one greedy sequence decodes and nothing else waits or prefills."""
        if self.drafter is None or len(scheduled.decode) != 1 or scheduled.prefill or self.scheduler.waiting:
            return False
        return scheduled.decode[0].sampler.argmax_only

    def _speculate(self, r: Request) -> list[StepOutput] | None:
        """One speculative step of a sequence decoding alone: the draft proposes up to k tokens, the target
        checks them in one pass (its logits after each) and keeps those it would have chosen itself, plus its
        own next token; the keys of the rest are dropped. None where no room is left for it (a plain step)."""
        assert self.drafter is not None
        last = r.num_computed  # the position of the last token, sampled and not yet fed
        # the draft feeds positions up to last + k - 1: a draft with a shorter context than the target's stops
        # drafting at its end (its position tables end there)
        k = min(self.drafter.k, r.budget - len(r.output) - 1, self.context - 1 - last, self.drafter.context - last)
        if k < 1 or not self.cache.reserve(r.seq_id, last + k + 1):
            return None
        tokens = r.tokens
        drafts = self.drafter.propose(r.seq_id, tokens, k, limit=len(r.prompt) + r.budget + self.drafter.k + 1)
        rows = self._call(np.array([[tokens[-1], *drafts]], dtype=np.int64), [k + 1], [r.seq_id], every=True)
        choices = np.asarray(rows).argmax(axis=-1).tolist()
        kept = 0
        while kept < k and drafts[kept] == choices[kept]:
            kept += 1
        stats = self.drafter.stats
        stats.proposed, stats.accepted, stats.passes = stats.proposed + k, stats.accepted + kept, stats.passes + 1
        r.num_computed = last + 1 + kept  # the last token and the kept drafts; the target's own next one is pending
        self._rewind(r.seq_id, r.num_computed)
        self.drafter.keep(r.seq_id, last + 1 + min(kept, k - 1))  # the draft fed its own proposals but the last
        outputs: list[StepOutput] = []
        for j in range(kept + 1):  # each kept token is the target's greedy choice after the ones before it
            outputs += self._update([r], rows[j : j + 1])
            if r.status.finished:
                break
        return outputs

    def _rewind(self, seq_id: int, length: int) -> None:
        """Drop the keys and values of a sequence after its first `length` tokens (rejected drafts)."""
        self.cache.seqs[seq_id].length = length
        self.cache.trim(seq_id, length + 1)  # the blocks reserved for rejected drafts go back (the next token's stay)
        if not isinstance(self.model, LlamaModel):
            self.model.rewind(seq_id, length)

    def _forward(self, items: Sequence[tuple[Request, int]], every: bool = False) -> Logits:
        """Feed each request its next n tokens; returns the logits after each one's last token [B, V]
        (with `every`, one request's logits at each of its n tokens, [n, V]).

        The onnxruntime runtime takes and returns numpy arrays: at batch 1 the engine's Python between two
        session runs is on the critical path, and each torch call there (tensor creation, dtype checks,
        inference mode) cost tens of microseconds once the run had evicted the caches (a decode step's
        gap between runs fell from about 320 to 165 us without them, on a 6 ms int4 step).
        """
        width = max(n for _, n in items)
        if isinstance(self.model, LlamaModel):
            room = self.model.spec.max_position - max(r.num_computed for r, _ in items)  # RoPE table's end
            width = max(width, min(padded_width(width), room))
        rows = [r.token_range(r.num_computed, r.num_computed + n) for r, n in items]
        tokens = np.array([row + [0] * (width - len(row)) for row in rows], dtype=np.int64)
        logits = self._call(tokens, [n for _, n in items], [r.seq_id for r, _ in items], every)
        for r, n in items:
            r.num_computed += n
        return logits

    def _call(self, tokens: np.ndarray, counts: list[int], seq_ids: list[int], every: bool = False) -> Logits:
        """The model's step over the engine's cache: row i appends tokens[i, :counts[i]] to sequence seq_ids[i]."""
        if isinstance(self.model, LlamaModel):
            logits = self.model(torch.from_numpy(tokens), self.cache, num_tokens=counts, rows=seq_ids,
                                logits="all" if every else "last")
            return logits[0, : counts[0]] if every else logits
        return self.model.step(tokens, self.cache, counts, seq_ids, every=every)

    def _update(self, requests: list[Request], logits: Logits) -> list[StepOutput]:
        now = time.perf_counter()
        tokens = sample(logits, [r.sampler for r in requests])
        outputs = []
        for i, (r, tok) in enumerate(zip(requests, tokens, strict=True)):
            r.first_token_at = r.first_token_at or now
            constraint = r.sampler.constraint
            if constraint is not None and constraint.error is not None:  # this sequence fails; the batch goes on
                r.error = constraint.error
                outputs.append(self._finish(r, RequestStatus.FINISHED_ABORTED, now, [], "", flush=False))
                continue
            if r.params.logprobs is not None:
                r.logprobs.append(token_logprob(logits[i], tok, r.params.logprobs))
            # the sampler keeps these tokens out until min_tokens are generated
            if (tok in self.tokenizer.eos_token_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                outputs.append(self._finish(r, RequestStatus.FINISHED_STOPPED, now, [], ""))
                continue
            r.output.append(tok)
            r.token_times.append(now)
            released, stopped = r.stops.feed(r.detok.push(tok), armed=len(r.output) >= r.params.min_tokens)
            r.text += released
            if stopped:
                outputs.append(self._finish(r, RequestStatus.FINISHED_STOPPED, now, [tok], released, flush=False))
            elif len(r.output) >= r.budget:
                outputs.append(self._finish(r, RequestStatus.FINISHED_LENGTH, now, [tok], released))
            else:
                outputs.append(StepOutput(r, [tok], released, False))
        return outputs

    def _finish(self, r: Request, status: RequestStatus, now: float, tokens: list[int], text: str,
                flush: bool = True) -> StepOutput:
        if flush:
            tail, stopped = r.stops.feed(r.detok.flush(), armed=len(r.output) >= r.params.min_tokens)
            tail = tail if stopped else tail + r.stops.flush()
            status = RequestStatus.FINISHED_STOPPED if stopped else status
            r.text += tail
            text += tail
        r.finish(status, now)
        self.scheduler.remove(r)
        self.requests.pop(r.request_id, None)
        if self.drafter is not None:
            self.drafter.forget(r.seq_id)
        return StepOutput(r, tokens, text, True)

    def _finish_overlong(self) -> list[StepOutput]:
        """A sequence that outgrows the whole KV cache stops with finish reason 'length'; its last output is
        returned with the step's, as any finished one (a server waits for it: without it the client hung)."""
        return [self._finish(r, RequestStatus.FINISHED_LENGTH, time.perf_counter(), [], "")
                for r in [*self.scheduler.running, *self.scheduler.waiting]
                if r.num_tokens + 1 > self.cache.capacity_tokens]

    # --- offline use -------------------------------------------------------------------------------

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work:
            self.step()

