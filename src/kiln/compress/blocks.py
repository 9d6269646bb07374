"""Walk a model's decoder blocks one at a time over calibration data, collecting what each linear layer sees.

Calibration-based methods (GPTQ, AWQ, SmoothQuant, Wanda) change block i using inputs produced by the
already-changed blocks before it, as their papers do. The hidden states of all calibration samples at
the current block's input are kept in memory ([samples, tokens, hidden]); blocks run without a cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from kiln.model.kv_cache import AttentionBatch, uncached_batch
from kiln.model.llama import Block, LlamaModel

# The linear layers of a block and where their input comes from.
LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass
class InputStats:
    """Statistics of the inputs [tokens, in] one linear layer received."""

    in_features: int
    hessian: bool = False  # accumulate X^T X (GPTQ, AWQ)
    count: int = 0
    abs_sum: Tensor = field(init=False)
    sq_sum: Tensor = field(init=False)
    abs_max: Tensor = field(init=False)
    xtx: Tensor | None = field(init=False, default=None)
    drift: Tensor | None = field(init=False, default=None)  # sum of (x_reference - x)^T x, see `update_pair`
    residual: Tensor | None = field(init=False, default=None)  # sum of (r_reference - r)^T x [out, in]

    def __post_init__(self) -> None:
        self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.sq_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.abs_max = torch.zeros(self.in_features)
        if self.hessian:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        self.count += x.shape[0]
        self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += (x * x).sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()

    def update_pair(self, x: Tensor, reference: Tensor, residual_drift: Tensor | None = None) -> None:
        """Also record how these inputs differ from the uncompressed model's inputs `reference` and, for a
        layer that writes into the residual stream, how far that stream has drifted (`residual_drift`)."""
        self.update(x)
        x = x.reshape(-1, self.in_features).float()
        delta = reference.reshape(-1, self.in_features).float() - x
        term = (delta.T @ x).double()
        self.drift = term if self.drift is None else self.drift + term
        if residual_drift is not None:
            r = (residual_drift.reshape(x.shape[0], -1).float().T @ x).double()
            self.residual = r if self.residual is None else self.residual + r

    def drift_corrected(self, weight: Tensor, damp: float) -> Tensor:
        """The weight W* whose outputs on these inputs best match the original W on the uncompressed
        model's inputs: W* = W + W Δᵀ X (Xᵀ X + λ I)^-1 (least squares, λ as GPTQ's damping).

        GPTQ on W* with the usual Hessian then minimises |W_q X - W X_ref|², the error against the
        uncompressed model rather than against this layer's own drifted inputs (the idea of GPTAQ,
        arXiv 2504.02692). A layer that adds into the residual stream (o_proj, down_proj) also aims at
        the stream's drift R: W* += Rᵀ X (Xᵀ X + λ I)^-1, so it makes up for earlier layers' errors.
        Measured on the default model at int4 g128 (BENCHMARKS.md): each term lowers Δppl."""
        assert self.xtx is not None and self.drift is not None, "collect with hessian=True and update_pair"
        xtx = self.xtx.clone()
        dead = torch.diag(xtx) == 0
        xtx[dead, dead] = 1
        xtx += damp * torch.diag(xtx).mean() * torch.eye(self.in_features, dtype=xtx.dtype)
        target = weight.double() @ self.drift  # W Δᵀ X [out, in]
        if self.residual is not None:  # this layer also makes up for the residual stream's drift
            target = target + self.residual
        return (weight.double() + torch.linalg.solve(xtx, target.T).T).float()  # (XᵀX + λI) is symmetric

    @property
    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(1, self.count)).float()

    @property
    def norm(self) -> Tensor:
        """Per-input-channel L2 norm over all tokens (Wanda's ||X_j||)."""
        return self.sq_sum.sqrt().float()

    def gram(self) -> Tensor:
        """XᵀX / tokens: the mean squared output error of weights off by D is tr(D G Dᵀ) / out."""
        assert self.xtx is not None, "collect with hessian=True"
        return (self.xtx / max(1, self.count)).float()

    def hessian_matrix(self) -> Tensor:
        """GPTQ's H = 2 XᵀX / tokens (doubling is exact, so this equals the former float64 2·XᵀX / tokens)."""
        return 2 * self.gram()

    def divide_inputs(self, s: Tensor) -> None:
        """The statistics of x / s (per input channel), after s was folded into what produces x."""
        s64 = s.double()  # not in place: the sums may be inference tensors from `collect`
        self.abs_sum = self.abs_sum / s64
        self.sq_sum = self.sq_sum / (s64 * s64)
        self.abs_max = self.abs_max / s.float()
        if self.xtx is not None:
            self.xtx = self.xtx / (s64.unsqueeze(1) * s64.unsqueeze(0))


class BlockWalker:
    """Feeds calibration tokens through the blocks; `collect` gathers inputs, `advance` moves on."""

    def __init__(self, model: LlamaModel, tokens: Tensor, batch_size: int = 8, reference: bool = False) -> None:
        self.model = model
        self.batches = list(tokens.split(batch_size))
        with torch.inference_mode():
            self.hidden = [model.embed(b).float().clone() for b in self.batches]  # block 0's inputs
        # with `reference`, the uncompressed model's hidden states go along too (twice the memory)
        self.reference = [h.clone() for h in self.hidden] if reference else None
        # the reference stream's outputs of the block `collect(drift=...)` last ran, for `advance` to move on to
        self._reference_out: tuple[int, list[Tensor]] | None = None
        seq = tokens.shape[1]
        self.meta = {b.shape[0]: uncached_batch([seq] * b.shape[0], seq, model.spec.sliding_window)
                     for b in self.batches}
        positions = self.meta[self.batches[0].shape[0]].positions[0]
        self.cos = model.cos_table[positions].view(1, 1, seq, -1)
        self.sin = model.sin_table[positions].view(1, 1, seq, -1)

    def block(self, index: int) -> Block:
        layer = self.model.layers[index]
        assert isinstance(layer, Block)
        return layer

    @torch.inference_mode()
    def run(self, index: int) -> list[Tensor]:
        """Outputs of block `index` for every batch."""
        block = self.block(index)
        return [block(h, self.cos, self.sin, self.meta[h.shape[0]], None) for h in self.hidden]

    @torch.inference_mode()
    def collect(self, index: int, names: tuple[str, ...], hessian: bool = False,
                drift: tuple[str, ...] = ()) -> dict[str, InputStats]:
        """Run block `index` and return the input statistics of its linear layers `names`. For the layers in
        `drift` the stats also hold how their inputs differ from the uncompressed model's: the reference
        stream runs through the block as it is now, so collect before changing it; its outputs are kept for
        `advance`."""
        block = self.block(index)
        stats = {n: InputStats(_in_features(block.get_submodule(n)), hessian or n in drift) for n in names}
        if not drift:
            with _hooks(block, {n: s.update for n, s in stats.items()}):
                self.run(index)
            return stats
        assert self.reference is not None, "drift needs a walker with reference=True"
        reference: dict[str, Tensor] = {}  # this batch's inputs to the `drift` layers on the reference stream

        def keep(name: str, x: Tensor) -> None:
            reference[name] = x.clone()

        def update(name: str, x: Tensor) -> None:
            if name in drift:
                stats[name].update_pair(x, reference[name])
            else:
                stats[name].update(x)

        outputs = []
        for h, h_ref in zip(self.hidden, self.reference, strict=True):
            with _hooks(block, {n: partial(keep, n) for n in drift}):
                outputs.append(block(h_ref, self.cos, self.sin, self.meta[h_ref.shape[0]], None))
            with _hooks(block, {n: partial(update, n) for n in names}):
                block(h, self.cos, self.sin, self.meta[h.shape[0]], None)
        self._reference_out = (index, outputs)
        return stats

    @torch.inference_mode()
    def sequential(self, index: int) -> Iterator[tuple[str, InputStats]]:
        """True-sequential inputs (GPTQ): yields (name, statistics of its inputs) for each layer of block
        `index` in forward order (LINEARS); the caller replaces that layer before asking for the next, so each
        layer sees the already-changed ones before it. After the last, the walker moves past the block, as
        `advance` does.

        Each batch carries its activations from one layer to the next (attention output, residual stream
        after attention, gated activation), so a stream runs through the block once in all, not once up to
        every layer: about half the work on a Llama block. With a reference stream, the stats also hold the drift
        from the uncompressed model's inputs, which run through a copy of the block as it was."""
        block = self.block(index)
        streams = [_Stages(block, h, self.cos, self.sin, self.meta[h.shape[0]]) for h in self.hidden]
        references = None
        if self.reference is not None:
            original = copy.deepcopy(block)
            references = [_Stages(original, h, self.cos, self.sin, self.meta[h.shape[0]], fixed=True)
                          for h in self.reference]
        for name in LINEARS:
            stats = InputStats(_in_features(block.get_submodule(name)), hessian=True)
            for i, stream in enumerate(streams):
                x, at = stream.input_to(name)
                if references is None:
                    stats.update(x)
                    continue
                x_ref, at_ref = references[i].input_to(name)
                drift = at_ref - at if name in ("attn.o_proj", "mlp.down_proj") else None
                stats.update_pair(x, x_ref, drift)
            yield name, stats
        self.hidden = [stream.output() for stream in streams]
        if references is not None:
            self.reference = [stream.output() for stream in references]

    def advance(self, index: int) -> None:
        """Replace the held hidden states by block `index`'s outputs (call after changing the block). A
        reference stream moves on to the outputs `collect(index, drift=...)` computed before the change
        (`sequential` moves its own)."""
        if self.reference is not None:
            assert self._reference_out is not None and self._reference_out[0] == index, \
                "a reference stream moves on from collect(index, drift=...), which ran the block as it was"
            self.reference = self._reference_out[1]
            self._reference_out = None
        self.hidden = self.run(index)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.model.layers)))


class _Stages:
    """One batch's way through a block a layer at a time, for `BlockWalker.sequential`: each layer's input
    is computed from the stage before it with the layers as they are now (the earlier ones already changed).
    A `fixed` block (the reference's copy) never changes, so its output is computed with down_proj's input
    and that input ([tokens, intermediate], the largest activation) is not kept."""

    def __init__(self, block: Block, h: Tensor, cos: Tensor, sin: Tensor, meta: AttentionBatch,
                 fixed: bool = False) -> None:
        self.block, self.h, self.cos, self.sin, self.meta, self.fixed = block, h, cos, sin, meta, fixed
        self.mixed: Tensor | None = None  # attention heads' output, o_proj's input
        self.mid: Tensor | None = None  # residual stream after attention
        self.act: Tensor | None = None  # gated activation, down_proj's input
        self.out: Tensor | None = None  # the block's output, once known

    def input_to(self, name: str) -> tuple[Tensor, Tensor]:
        """Layer `name`'s input and the residual stream at that point; names come in LINEARS order."""
        block = self.block
        if name == "attn.qkv_proj":
            return block.input_norm(self.h), self.h
        if name == "attn.o_proj":
            self.mixed = block.attn.mix(block.input_norm(self.h), self.cos, self.sin, self.meta, None)
            return self.mixed, self.h
        if name == "mlp.gate_up_proj":
            assert self.mixed is not None, "layers in LINEARS order"
            self.mid, self.mixed = self.h + block.attn.o_proj(self.mixed), None
            return block.post_attn_norm(self.mid), self.mid
        assert name == "mlp.down_proj" and self.mid is not None, "layers in LINEARS order"
        act = block.mlp.act(block.post_attn_norm(self.mid))
        if self.fixed:
            self.out = self.mid + block.mlp.down_proj(act)
        else:
            self.act = act
        return act, self.mid

    def output(self) -> Tensor:
        """The block's output (Block.forward's arithmetic), once every layer has been seen."""
        if self.out is None:
            assert self.mid is not None and self.act is not None, "every layer of the block first"
            self.out = self.mid + self.block.mlp.down_proj(self.act)
        return self.out


def _in_features(module: nn.Module) -> int:
    features = getattr(module, "in_features", None)
    assert isinstance(features, int)
    return features


@contextmanager
def _hooks(block: nn.Module, callbacks: dict[str, Callable[[Tensor], None]]) -> Iterator[None]:
    handles = [block.get_submodule(name).register_forward_pre_hook(lambda _m, args, cb=cb: cb(args[0]))
               for name, cb in callbacks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
