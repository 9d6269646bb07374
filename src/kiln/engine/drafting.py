"""The draft side of speculative decoding inside the engine (`kiln serve --draft`, `kiln generate --draft`).

When one sequence decodes alone (the engine's step has nothing else to batch, as always in `kiln
generate`), a small draft model proposes k greedy tokens after it and the target checks them in one pass
over the engine's own cache (Engine._speculate); where several sequences decode, the batch already
keeps the cores busy and the engine decodes as usual. The draft keeps keys per sequence and the count
of tokens they cover; a sequence that decoded without it meanwhile is caught up in one pass before its
next proposal.
Hand-written: which tokens the draft has seen is the engine's bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kiln.engine.speculative import SequenceRunner, check_draft, propose
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.engine.onnx_runtime import OnnxModel
    from kiln.model.llama import LlamaModel
    from kiln.types import Precision


@dataclass
class _DraftState:
    runner: SequenceRunner
    known: int = 0  # the sequence's first `known` tokens have keys in the draft


@dataclass
class SpeculationStats:
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, the ones the target kept
    passes: int = 0  # target passes that checked a proposal

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Drafter:
    def __init__(self, model: LlamaModel | OnnxModel, k: int, vocab_size: int) -> None:
        check_draft(model, k, vocab_size)
        self.model, self.k = model, k
        self.context = model.spec.max_position  # positions the draft can feed
        self.states: dict[int, _DraftState] = {}
        self.stats = SpeculationStats()

    @torch.inference_mode()
    def propose(self, seq_id: int, tokens: list[int], k: int, limit: int) -> list[int]:
        """k greedy draft tokens after `tokens`; `limit` bounds the sequence's length (the draft's cache)."""
        state = self.states.get(seq_id)
        if state is None:  # ids of its own: a draft that is the target's own ONNX session keeps apart
            state = self.states[seq_id] = _DraftState(SequenceRunner(self.model, limit, -1000 - seq_id))
        return propose(state.runner, tokens, state.known, k)

    def keep(self, seq_id: int, known: int) -> None:
        """The draft's keys stand for the sequence's first `known` tokens (the rest were rejected)."""
        self.states[seq_id].known = known

    def forget(self, seq_id: int) -> None:
        state = self.states.pop(seq_id, None)
        if state is not None:
            state.runner.close()


def load_drafter(source: str, k: int, vocab_size: int, runtime: str, precision: Precision) -> Drafter:
    """--draft M --speculate k: the draft model on the runtime --runtime picks for it (auto: per model, as the
    target's; the caller sets its engine thread's torch count for the target afterwards)."""
    from kiln.engine.onnx_runtime import pick_runtime
    from kiln.model.load import load

    try:
        model, _ = pick_runtime(load(source, precision=precision, progress=False), runtime, keep_weights=False)
    except KilnError as exc:  # the loader's words fit -m as well; say which of the two models they are about
        raise type(exc)(f"the draft model (--draft) failed to load: {exc}") from exc
    return Drafter(model, k, vocab_size)  # type: ignore[arg-type]
