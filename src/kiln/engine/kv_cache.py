"""A paged KV cache: fixed-size blocks from one pool sized by a memory budget in bytes.

Each sequence owns a list of blocks (its block table) that grows as it does, so nothing reserves a full
context. Full blocks of a prompt are keyed by a hash chained over all tokens before them; a later
sequence with the same prefix takes those blocks (reference counted) instead of recomputing them, as
vLLM's automatic prefix caching does. Unreferenced cached blocks are evicted least recently used.

The graph talks to it through the same three verbs as the static cache (begin / update / commit):
begin plans where each new token's keys and values go, update writes them and gathers every row's
keys and values into one padded tensor for attention. Hand-written: it is the engine's core.

With `int8=True` keys and values are stored as int8 with one fp32 scale per token and head (symmetric,
absmax / 127, as llama.cpp's q8_0 cache and vLLM's fp8 cache trade a little accuracy for room): a block
then costs (head_dim + 4) bytes per token and head instead of 4 * head_dim, so the same budget holds
about 3.8x the tokens at fp32 (1.9x at bf16). They are dequantized when gathered for attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kiln.errors import ContextLengthError
from kiln.model.kv_cache import AttentionBatch, build_masks
from kiln.model.spec import ModelSpec

SCRATCH = 0  # block 0 takes the writes of padding tokens and pads the gathers; it is never handed out


@dataclass
class SeqBlocks:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys and values are in the blocks
    hashes: list[int] = field(default_factory=list)  # hash of each full block registered for sharing


@dataclass
class PagedAttentionBatch(AttentionBatch):
    gather: Tensor | None = None  # [B, blocks] block ids to gather, padded with SCRATCH
    slot_block: Tensor | None = None  # [B * T] block of each new token (padding -> SCRATCH)
    slot_offset: Tensor | None = None  # [B * T] offset in that block
    seq_ids: tuple[int, ...] = ()


class PagedKVCache:
    """Keys and values of many sequences in blocks of `block_size` tokens, within `budget_bytes`."""

    def __init__(self, spec: ModelSpec, budget_bytes: int, dtype: torch.dtype, block_size: int = 16,
                 int8: bool = False, store: bool = True) -> None:
        per_block = block_size * self.bytes_per_token(spec, dtype, int8)
        self.num_blocks = int(budget_bytes // per_block)
        if self.num_blocks < 2:
            raise ContextLengthError(
                f"a KV budget of {budget_bytes:,} bytes holds no block of {block_size} tokens "
                f"({per_block:,} bytes); raise the budget"
            )
        # store=False: only the block accounting, for a runtime that keeps keys and values itself
        shape = (spec.num_layers, self.num_blocks, block_size, spec.num_kv_heads, spec.head_dim) if store else (0,)
        self.dtype = dtype
        self.int8 = int8
        self.k = torch.zeros(shape, dtype=torch.int8 if int8 else dtype)  # [L, blocks, block_size, Hkv, D]
        self.v = torch.zeros(shape, dtype=torch.int8 if int8 else dtype)
        scale_shape = (*shape[:-1], 1) if int8 and store else (0,)
        self.k_scale = torch.zeros(scale_shape, dtype=torch.float32)  # [L, blocks, block_size, Hkv, 1]
        self.v_scale = torch.zeros(scale_shape, dtype=torch.float32)
        self.block_size = block_size
        self.window = spec.sliding_window
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, SCRATCH, -1))  # pop() gives low ids first
        self.refs = [0] * self.num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.block_hash: dict[int, int] = {}  # block -> prefix hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence uses, oldest first
        self.seqs: dict[int, SeqBlocks] = {}
        # store=False: a runtime that keeps its own keys and values may keep its copies of published
        # prefix blocks here, indexed by these block ids, so they live and die with this cache
        self.runtime_store: list[Any] = []
        # such a runtime's own buffers for a sequence go when its blocks do (finished, cancelled, preempted),
        # not at the runtime's next step: an idle engine holds nothing for finished requests
        self.on_free: Callable[[int], None] | None = None

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype, int8: bool = False) -> int:
        """Cache bytes one token takes across all layers, keys and values."""
        if int8:
            return 2 * spec.num_layers * spec.num_kv_heads * (spec.head_dim + 4)  # int8 values + an fp32 scale
        return spec.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size())

    # --- accounting ---------------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def free_count(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - self.free_count

    def blocks_needed(self, seq_id: int, total_tokens: int) -> int:
        have = len(self.seqs[seq_id].blocks) if seq_id in self.seqs else 0
        return max(0, -(-total_tokens // self.block_size) - have)

    def _take_block(self) -> int:
        if self.free_blocks:
            return self.free_blocks.pop()
        block, _ = self.evictable.popitem(last=False)  # evict the least recently used cached block
        del self.cached[self.block_hash.pop(block)]
        return block

    def reserve(self, seq_id: int, total_tokens: int) -> bool:
        """Make room for `total_tokens` tokens of `seq_id`; False (and no change) if blocks run out."""
        need = self.blocks_needed(seq_id, total_tokens)
        if need > self.free_count:
            return False
        seq = self.seqs.setdefault(seq_id, SeqBlocks())
        for _ in range(need):
            block = self._take_block()
            self.refs[block] = 1
            seq.blocks.append(block)
        return True

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks at once; cached ones stay findable until evicted."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if self.on_free is not None:
            self.on_free(seq_id)
        for block in seq.blocks:
            self._release(block)

    def _release(self, block: int) -> None:
        """One holder less for `block`; with none left it is free, or evictable while its prefix is cached."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.block_hash:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    def trim(self, seq_id: int, total_tokens: int) -> None:
        """Give back a sequence's blocks past those its first `total_tokens` tokens need (speculative decoding
        reserved room for drafts that were then rejected)."""
        seq = self.seqs[seq_id]
        keep = max(-(-total_tokens // self.block_size), len(seq.hashes))
        while len(seq.blocks) > keep:
            self._release(seq.blocks.pop())

    # --- prefix caching -----------------------------------------------------------------------------

    def _chain(self, tokens: Sequence[int]) -> list[int]:
        """Hash of each full block, chained over all the tokens before it."""
        hashes, parent = [], 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = hash((parent, tuple(tokens[start : start + self.block_size])))
            hashes.append(parent)
        return hashes

    def attach_prefix(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Give a new sequence the cached blocks of its longest cached prefix; returns the tokens reused.

        At least one token is always left to compute, so the sequence gets logits for its next token.
        """
        seq = self.seqs.setdefault(seq_id, SeqBlocks())
        usable = (len(tokens) - 1) // self.block_size
        for h in self._chain(tokens)[:usable]:
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
            self.refs[block] += 1
            seq.blocks.append(block)
            seq.hashes.append(h)
        seq.length = len(seq.blocks) * self.block_size
        return seq.length

    def register_prefix(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Publish the full blocks of `tokens` (already computed for seq_id) for later sequences to share."""
        seq = self.seqs[seq_id]
        for i, h in enumerate(self._chain(tokens)):
            if i < len(seq.hashes) or i >= len(seq.blocks) or (i + 1) * self.block_size > seq.length:
                continue
            block = seq.blocks[i]
            seq.hashes.append(h)
            if h not in self.cached and block not in self.block_hash:
                self.cached[h] = block
                self.block_hash[block] = h

    def withdraw_prefix(self, seq_id: int, keep: int) -> None:
        """Make the blocks that register_prefix published for seq_id past its first `keep` findable no more (a runtime
        with its own keys and values failed to copy them into its store: a later sequence would restore nothing)."""
        seq = self.seqs[seq_id]
        for block, h in zip(seq.blocks[keep:], seq.hashes[keep:], strict=False):
            if self.cached.get(h) == block:
                del self.cached[h], self.block_hash[block]
        del seq.hashes[keep:]

    # --- the graph's cache protocol -----------------------------------------------------------------

    def begin(self, num_tokens: Sequence[int], seq_len: int, rows: Sequence[int] | None = None) -> PagedAttentionBatch:
        """Plan a forward pass appending num_tokens[i] tokens to sequence rows[i] (its blocks reserved)."""
        assert rows is not None, "a paged cache is addressed by sequence ids"
        seqs = [self.seqs[r] for r in rows]
        starts = [s.length for s in seqs]
        ends = [s + n for s, n in zip(starts, num_tokens, strict=True)]
        for s, end in zip(seqs, ends, strict=True):
            if end > len(s.blocks) * self.block_size:
                raise ContextLengthError("a sequence outgrew its reserved blocks; reserve() before the forward")
        batch = len(rows)
        cols = torch.arange(seq_len).unsqueeze(0)
        positions = torch.tensor(starts).unsqueeze(1) + cols  # [B, T]
        is_real = cols < torch.tensor(list(num_tokens)).unsqueeze(1)
        n_blocks = max(-(-e // self.block_size) for e in ends)
        gather = torch.full((batch, n_blocks), SCRATCH, dtype=torch.long)
        for i, s in enumerate(seqs):
            used = -(-ends[i] // self.block_size)
            gather[i, :used] = torch.tensor(s.blocks[:used])
        logical = positions // self.block_size
        slot_block = torch.where(is_real, gather.gather(1, logical.clamp(max=n_blocks - 1)), SCRATCH)
        if batch == 1 and seq_len == 1 and (self.window is None or ends[0] <= self.window):
            kv_len, mask, sliding = ends[0], None, None  # one new token: attend to exactly the row's keys
        else:
            kv_len = n_blocks * self.block_size
            mask, sliding = build_masks(positions, kv_len, self.window)
        return PagedAttentionBatch(
            positions=positions, num_tokens=list(num_tokens), last_index=torch.tensor([n - 1 for n in num_tokens]),
            kv_len=kv_len, mask=mask, sliding_mask=sliding, causal=False, rows=torch.tensor(list(rows)),
            gather=gather, slot_block=slot_block.flatten(), slot_offset=(positions % self.block_size).flatten(),
            seq_ids=tuple(rows),
        )

    def update(self, layer: int, k: Tensor, v: Tensor, batch: AttentionBatch) -> tuple[Tensor, Tensor]:
        """Write the new keys/values [B, Hkv, T, D]; return every row's keys/values [B, Hkv, S, D]."""
        assert isinstance(batch, PagedAttentionBatch) and batch.gather is not None
        assert batch.slot_block is not None and batch.slot_offset is not None
        b, hkv, t, d = k.shape
        new_k, new_v = k.transpose(1, 2).reshape(b * t, hkv, d), v.transpose(1, 2).reshape(b * t, hkv, d)
        where = (batch.slot_block, batch.slot_offset)
        flat = batch.gather.flatten()
        n = batch.gather.shape[1] * self.block_size
        if self.int8:
            for store, scales, new in ((self.k, self.k_scale, new_k), (self.v, self.v_scale, new_v)):
                q, scale = quantize_rows(new)
                store[layer][where], scales[layer][where] = q, scale
            keys = dequantize_rows(self.k[layer].index_select(0, flat), self.k_scale[layer].index_select(0, flat),
                                   k.dtype)
            values = dequantize_rows(self.v[layer].index_select(0, flat), self.v_scale[layer].index_select(0, flat),
                                     v.dtype)
        else:
            self.k[layer][where], self.v[layer][where] = new_k, new_v
            keys, values = self.k[layer].index_select(0, flat), self.v[layer].index_select(0, flat)
        keys = keys.view(b, n, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
        values = values.view(b, n, hkv, d).transpose(1, 2)
        return keys[:, :, : batch.kv_len], values[:, :, : batch.kv_len]

    def advance(self, rows: Sequence[int], num_tokens: Sequence[int]) -> None:
        """The accounting half of begin() + commit(), for a runtime that keeps its own keys and values."""
        seqs = [self.seqs[r] for r in rows]
        if any(s.length + n > len(s.blocks) * self.block_size for s, n in zip(seqs, num_tokens, strict=True)):
            raise ContextLengthError("a sequence outgrew its reserved blocks; reserve() before the forward")
        for seq, n in zip(seqs, num_tokens, strict=True):
            seq.length += n

    def commit(self, batch: AttentionBatch) -> None:
        assert isinstance(batch, PagedAttentionBatch)
        for seq_id, n in zip(batch.seq_ids, batch.num_tokens, strict=True):
            self.seqs[seq_id].length += n


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 over the last dimension: (int8 values, fp32 scale with a trailing 1)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.to(torch.float32) * scale).to(dtype)
