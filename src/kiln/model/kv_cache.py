"""A preallocated KV cache holding a batch of sequences, each row at its own length.

Written by hand because it is the product's core: the graph asks it where each new token goes and
what to attend to (`begin` -> `update` per layer -> `commit`), so continuous batching and paged caches
can swap in behind the same three verbs. This one reserves `max_len` positions per row up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kiln.errors import ContextLengthError
from kiln.model.spec import ModelSpec


@dataclass
class AttentionBatch:
    """Where the tokens of one forward pass sit; built once per forward, read by every layer."""

    positions: Tensor  # [B, T] absolute position of each input token (drives RoPE)
    num_tokens: list[int]  # real tokens per row; the rest of T is right padding
    last_index: Tensor  # [B] index along T of each row's last real token
    kv_len: int  # S: keys each layer attends over
    mask: Tensor | None  # [B, 1, T, S] True = may attend; None = see `causal`
    sliding_mask: Tensor | None  # same with the sliding window applied (only if a layer slides)
    causal: bool  # with mask None: True = plain causal (T == S), False = attend to all S keys
    rows: Tensor | None = None  # [B] cache rows used; None = rows 0..B-1
    block_start: int | None = None  # rows 0..B-1 all write T tokens from this slot: a plain slice
    write_rows: Tensor | None = None  # [B, T] cache row of each token
    write_pos: Tensor | None = None  # [B, T] cache slot of each token; padding -> a scratch slot


class KVCache(Protocol):
    """What the graph asks of a cache: plan a forward pass, store and return keys/values, advance."""

    def begin(self, num_tokens: Sequence[int], seq_len: int, rows: Sequence[int] | None = None) -> AttentionBatch:
        ...

    def update(self, layer: int, k: Tensor, v: Tensor, batch: AttentionBatch) -> tuple[Tensor, Tensor]:
        ...

    def commit(self, batch: AttentionBatch) -> None:
        ...


def build_masks(
    positions: Tensor, kv_len: int, window: int | None
) -> tuple[Tensor, Tensor | None]:
    """Causal (and sliding-window) masks for queries at `positions` over keys 0..kv_len-1."""
    keys = torch.arange(kv_len).view(1, 1, 1, kv_len)
    query = positions.unsqueeze(1).unsqueeze(-1)  # [B, 1, T, 1]
    mask = keys <= query
    sliding = mask & (keys > query - window) if window is not None else None
    return mask, sliding


def uncached_batch(num_tokens: Sequence[int], seq_len: int, window: int | None) -> AttentionBatch:
    """Metadata for a forward pass with no cache: every row starts at position 0."""
    batch = len(num_tokens)
    positions = torch.arange(seq_len).expand(batch, seq_len)
    sliding = None
    if window is not None and seq_len > window:
        _, sliding = build_masks(positions, seq_len, window)
    return AttentionBatch(
        positions=positions,
        num_tokens=list(num_tokens),
        last_index=torch.tensor([n - 1 for n in num_tokens]),
        kv_len=seq_len,
        mask=None,
        sliding_mask=sliding,
        causal=True,
    )


class StaticKVCache:
    """Keys and values for `batch_size` rows of up to `max_len` tokens, in all layers.

    Layout [layers, rows, kv_heads, max_len + 1, head_dim]: the extra slot takes the writes of
    padding tokens, so a right-padded batch never overwrites a row's real entries.
    """

    def __init__(self, spec: ModelSpec, batch_size: int, max_len: int, dtype: torch.dtype) -> None:
        shape = (spec.num_layers, batch_size, spec.num_kv_heads, max_len + 1, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.window = spec.sliding_window
        self.lengths = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget the tokens of `rows` (all rows if None); their slots are overwritten later."""
        for r in range(self.batch_size) if rows is None else rows:
            self.lengths[r] = 0

    def fork(self, src: int, dst: Sequence[int]) -> None:
        """Give rows `dst` a copy of row `src`'s tokens (a shared prompt computed once)."""
        n = self.lengths[src]
        if not dst:
            return
        index = torch.tensor(list(dst), dtype=torch.long)
        self.k[:, index, :, :n] = self.k[:, src : src + 1, :, :n]
        self.v[:, index, :, :n] = self.v[:, src : src + 1, :, :n]
        for r in dst:
            self.lengths[r] = n

    def begin(
        self, num_tokens: Sequence[int], seq_len: int, rows: Sequence[int] | None = None
    ) -> AttentionBatch:
        """Plan a forward pass of `seq_len` columns appending num_tokens[i] tokens to row rows[i]."""
        row_ids = list(range(len(num_tokens))) if rows is None else list(rows)
        starts = [self.lengths[r] for r in row_ids]
        ends = [s + n for s, n in zip(starts, num_tokens, strict=True)]
        if max(ends) > self.max_len:
            raise ContextLengthError(
                f"{max(ends)} tokens do not fit the KV cache of {self.max_len} positions; "
                "shorten the prompt or lower max tokens"
            )
        kv_len = max(ends)
        batch = len(row_ids)
        start_t = torch.tensor(starts).unsqueeze(1)
        cols = torch.arange(seq_len).unsqueeze(0)
        positions = start_t + cols  # [B, T]
        is_real = cols < torch.tensor(list(num_tokens)).unsqueeze(1)
        write_pos = torch.where(is_real, positions, torch.full_like(positions, self.max_len))
        uniform = len(set(starts)) == 1 and len(set(num_tokens)) == 1 and num_tokens[0] == seq_len
        mask = sliding = None
        causal = True
        needs_window = self.window is not None and kv_len > self.window
        if uniform and starts[0] == 0 and not needs_window:
            causal = True  # one block from position 0: plain causal attention
        elif uniform and seq_len == 1 and not needs_window:
            causal = False  # one new token per row, all rows equally long: attend to every key
        else:
            mask, sliding = build_masks(positions, kv_len, self.window)
        all_rows = row_ids == list(range(batch))
        return AttentionBatch(
            positions=positions,
            num_tokens=list(num_tokens),
            last_index=torch.tensor([n - 1 for n in num_tokens]),
            kv_len=kv_len,
            mask=mask,
            sliding_mask=sliding,
            causal=causal,
            rows=None if all_rows else torch.tensor(row_ids),
            block_start=starts[0] if uniform and all_rows else None,
            write_rows=torch.tensor(row_ids).unsqueeze(1).expand(batch, seq_len),
            write_pos=write_pos,
        )

    def update(self, layer: int, k: Tensor, v: Tensor, batch: AttentionBatch) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values [B, Hkv, T, D]; return all keys/values [B, Hkv, S, D]."""
        s = batch.kv_len
        if batch.block_start is not None:  # the common decode case: one slice copy, no scatter
            b, t = k.shape[0], k.shape[2]
            self.k[layer, :b, :, batch.block_start : batch.block_start + t] = k
            self.v[layer, :b, :, batch.block_start : batch.block_start + t] = v
            return self.k[layer, :b, :, :s], self.v[layer, :b, :, :s]
        assert batch.write_rows is not None and batch.write_pos is not None
        index = (batch.write_rows, slice(None), batch.write_pos)
        self.k[layer][index] = k.transpose(1, 2)  # indexed view is [B, T, Hkv, D]
        self.v[layer][index] = v.transpose(1, 2)
        if batch.rows is None:
            b = len(batch.num_tokens)
            return self.k[layer, :b, :, :s], self.v[layer, :b, :, :s]
        return self.k[layer][batch.rows, :, :s], self.v[layer][batch.rows, :, :s]

    def commit(self, batch: AttentionBatch) -> None:
        """Advance the lengths of the rows the forward pass wrote."""
        rows = range(len(batch.num_tokens)) if batch.rows is None else batch.rows.tolist()
        for r, n in zip(rows, batch.num_tokens, strict=True):
            self.lengths[r] += n
