"""The `onnxruntime` runtime: kiln's engine (scheduler, sampler, stop strings) over an ONNX Runtime session.

The session runs the graph `kiln export --format onnx` writes (ORT GenAI's builder: GroupQueryAttention,
MatMulNBits). Its keys and values are explicit inputs and outputs, so this class keeps them per sequence
and answers the same call the engine makes on kiln's torch graph: append each row's tokens to that
sequence and return logits. A sequence's keys and values live in exactly one place. While it runs alone
(its prompt, or decoding by itself) that is its own buffer per layer, bound as both the past input and
the present output (GroupQueryAttention's shared-buffer mode writes the new keys in place, so a step
copies nothing) and grown by a quarter when full; the binding lives as long as the buffers, so a decode
step only rebinds its token, mask and logits. While several sequences decode together (`_decode_batch`) their keys
and values move into one batch buffer, bound the same way, and their own buffers are freed: decoding
copies nothing and holds no second copy. Exports that have the `logits_to_keep` input compute lm_head on
the last position only. The engine's paged cache does the accounting (budget, admission, preemption) and
stores nothing itself. First prompt chunks of one width batch too. An int4 export's prompt chunks of
PREFILL_ROWS tokens or more run on its prefill graph, a second session bound to the same buffers.

Prefix caching: when the engine publishes a prompt's full blocks, their keys and values are copied out of
the sequence's buffers into a block store laid out like the engine's pool (indexed by the engine's block
ids, so the engine's reference counts and eviction decide what stays valid); a later sequence that the
engine attaches to those blocks gets them copied back into its fresh buffers instead of recomputed. Only
prompts are copied, once each, so decode steps pay nothing. The store is allocated empty, so only the
blocks ever published take memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from kiln import settings
from kiln.artifact.onnx_export import (
    EXPORT_VERSION,
    LOGITS_TO_KEEP,
    ONNX_FILE,
    PREFILL_DATA,
    PREFILL_FILE,
    RUNTIME_FILE,
    export_problem,
)
from kiln.benchmark.machine import available_bytes
from kiln.engine import RUNTIMES
from kiln.engine.hugepages import with_huge_pages
from kiln.engine.kv_cache import PagedKVCache
from kiln.engine.threads import PROCESS_THREADS, use_threads_for
from kiln.errors import InvalidParameterError, KilnError, ModelFormatError
from kiln.model.load import LoadedModel
from kiln.model.spec import ModelSpec

FIRST_CAPACITY = 256  # tokens a sequence's own key/value buffers hold at least
HUGE_PAGES_FROM = 64 << 20  # bytes of exported weights from which a session's memory moves to huge pages
PREFILL_ROWS = 32  # tokens per row from which a step runs on an int4 export's prefill graph (at or past the crossing)


@dataclass
class _BatchKV:
    """Several sequences' keys and values side by side, [B, Hkv, capacity, D] per past input, bound as both
    past and present; with the preallocated logits [B, 1, V] the binding writes. The only copy of its
    sequences' keys and values."""

    seqs: list[int | None]  # row j's sequence; None once it left (finished, or moved to its own buffers)
    lengths: list[int]  # tokens each row holds
    arrays: list[np.ndarray]
    values: list[Any]  # onnxruntime.OrtValue over the same memory
    binding: Any
    logits: np.ndarray

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]


@dataclass
class _SeqKV:
    """One sequence's keys and values: [1, Hkv, capacity, D] per past input, and their ORT wrappers."""

    arrays: list[np.ndarray]
    values: list[Any]  # onnxruntime.OrtValue over the same memory
    binding: Any  # onnxruntime.IOBinding with `values` bound as both past input and present output
    keep: int = 1  # the logits_to_keep value bound now


_POOL_THREADS: list[int] = []  # the shared pool's size, once set


def kv_capacity(tokens: int) -> int:
    """Tokens a key/value buffer (a sequence's own, or a decode batch's rows) gets when it must hold
    `tokens`: a quarter more, so a growing sequence moves O(1) times per token on average, and at most a
    fifth of the buffer is ever empty (doubling left up to half of it)."""
    return max(FIRST_CAPACITY, tokens + tokens // 4 + 16)


def _shared_pool(ort: Any, threads: int) -> None:
    if not _POOL_THREADS:
        ort.set_global_thread_pool_sizes(threads, 1)
        _POOL_THREADS.append(threads)


def session_options(threads: int | None = None) -> Any:
    """The settings of every session the onnxruntime runtime makes (and of the plan's timing graphs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads spin between ops: 7 ms per int4 decode step here instead of 11 on an idle
    # machine, but when other jobs share a small CPU the spinning steals their cores (and ours):
    # KILN_ORT_SPIN=0 turns it off for such hosts (per-session pools: only they take that setting)
    if not settings.ort_spin():
        options.intra_op_num_threads = threads or PROCESS_THREADS
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        # one pool for every session of the process (its size is the first session's): two sessions
        # with pools of their own (a target and its draft) keep each other's spinning threads on the
        # cores; speculative decoding ran at 0.9x plain decoding that way, 1.4x with one pool
        _shared_pool(ort, threads or PROCESS_THREADS)
        options.use_per_session_threads = False
    return options


def ort_reason(exc: Exception) -> str:
    """ONNX Runtime's message without its error code and the C++ source location and signature it carries."""
    said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    said = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", said)
    return re.sub(r"/\S+\.(?:cc|cpp|h):\d+ \S.*?\) ", " ", said)


class OnnxModel:
    """Callable like LlamaModel for the engine: (tokens, cache, num_tokens, rows, logits) -> logits."""

    owns_kv = True  # the engine's cache must not store keys and values for it
    dtype = torch.float32
    torch_threads = 1  # torch only samples beside the session (engine/threads.py)

    def __init__(self, folder: Path, spec: ModelSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = session_options(threads)
        weights = sum(f.stat().st_size for f in folder.glob("*.onnx*") if f.name not in (PREFILL_FILE, PREFILL_DATA))

        def load(graph: Path) -> Any:
            def build() -> Any:
                try:
                    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
                except Exception as exc:  # ONNX Runtime's errors (Fail, InvalidGraph, ...) derive from Exception only
                    raise ModelFormatError(f"ONNX Runtime {ort.__version__} cannot load {graph} ({ort_reason(exc)}); "
                                           f"delete {folder} to build the export again, or pass --runtime "
                                           "torch") from exc

            # 2 MiB pages pay off when a step streams far more weights than the TLB covers (a few MB of small pages)
            return with_huge_pages(build)[0] if weights >= HUGE_PAGES_FROM else build()

        self.session = load(folder / RUNTIME_FILE if (folder / RUNTIME_FILE).is_file() else folder / ONNX_FILE)
        # int4 exports: prompt chunks of PREFILL_ROWS or more run on a graph whose int4 layers are widened to
        # 8-bit blocks (artifact/onnx_export.write_prefill_graph says why); KILN_ORT_PREFILL=0 saves its copy
        # of the weights
        use_prefill = (folder / PREFILL_FILE).is_file() and settings.ort_prefill_graph()
        self.prefill_session = load(folder / PREFILL_FILE) if use_prefill else None
        # what that session's copy of the weights holds: the export's, with the int4 blocks it widened (half
        # the bytes of their 8-bit form in PREFILL_DATA) in 8 bits
        widened = (folder / PREFILL_DATA).stat().st_size if (folder / PREFILL_DATA).is_file() else 0
        self.prefill_bytes = weights + widened // 2 if use_prefill else 0
        self.spec = spec
        self.folder = folder
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.states: dict[int, _SeqKV] = {}  # sequence id -> its key/value buffers
        self._batch: _BatchKV | None = None  # the decode batch's shared buffers (_decode_batch)
        self.lengths: dict[int, int] = {}  # sequence id -> tokens in its buffers
        self._ort = ort
        self.keeps_last = LOGITS_TO_KEEP in names  # an export older than version 2 has no such input
        self._one = np.ones(1, dtype=np.int64)
        self._mask = np.ones((1, FIRST_CAPACITY), dtype=np.int64)  # sliced to each step's length
        self._last = np.empty((1, 1, spec.vocab_size), dtype=np.float32)  # one row's last logits
        self._last_value = ort.OrtValue.ortvalue_from_numpy(self._last)
        self.published: dict[int, int] = {}  # sequence id -> its leading blocks already in the block store

    shares_prefixes = True  # the engine may attach cached prompt blocks: publish() and _restore() serve them

    def _store(self, cache: PagedKVCache) -> list[np.ndarray]:
        """The block store, per past input [engine blocks, Hkv, block, D], kept on the engine's cache."""
        store: list[np.ndarray] = cache.runtime_store
        if not store:
            shape = (cache.num_blocks, self.spec.num_kv_heads, cache.block_size, self.spec.head_dim)
            store += [np.empty(shape, dtype=np.float32) for _ in self.past_names]  # untouched until written
        return store

    def publish(self, seq: int, cache: PagedKVCache) -> None:
        """Copy the sequence's registered full prompt blocks (cache.register_prefix) into the block store."""
        blocks = cache.seqs[seq]
        layers = self._layers(seq)
        if not layers:
            return
        size, store = cache.block_size, self._store(cache)
        first, last = self.published.get(seq, 0), min(len(blocks.hashes), blocks.length // size)
        for i in range(first, last):
            for pool, array in zip(store, layers, strict=True):
                pool[blocks.blocks[i]] = array[:, i * size : (i + 1) * size]
        self.published[seq] = max(first, last)

    def _restore(self, seq: int, start: int, cache: PagedKVCache) -> None:
        """Fill a sequence's first `start` positions from the store: the engine attached cached blocks."""
        self._touch(seq)
        size, store = cache.block_size, cache.runtime_store
        blocks = cache.seqs[seq].blocks[: start // size]
        if not store or start % size or len(blocks) * size != start:
            raise InvalidParameterError("the ONNX runtime lost a sequence's keys and values; run it with prefix "
                                        "caching off")
        kv = self._buffers(seq, start)
        for pool, array in zip(store, kv.arrays, strict=True):
            picked = pool[blocks]  # [blocks, Hkv, block, D]
            array[0, :, :start] = picked.transpose(1, 0, 2, 3).reshape(picked.shape[1], start, picked.shape[3])
        self.published[seq] = len(blocks)  # those blocks are in the store already

    def _layers(self, seq: int) -> list[np.ndarray]:
        """The sequence's keys and values per past input, [Hkv, capacity, D], wherever they live ([] if nowhere)."""
        batch = self._batch
        if batch is not None and seq in batch.seqs:
            row = batch.seqs.index(seq)
            return [array[row] for array in batch.arrays]
        kv = self.states.get(seq)
        return [array[0] for array in kv.arrays] if kv is not None else []

    def _empty(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def _run(self, ids: np.ndarray, past: list[np.ndarray], last: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ([B, T, V], or [B, 1, V] with `last` where the graph allows) and the presents."""
        total = past[0].shape[2] + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), dtype=np.int64),
                 **dict(zip(self.past_names, past, strict=True))}
        if self.keeps_last:
            feeds[LOGITS_TO_KEEP] = self._one if last else np.array([ids.shape[1]], dtype=np.int64)
        logits, *presents = self._session_for(ids.shape[1]).run(["logits", *self.present_names], feeds)
        return logits, presents

    def _session_for(self, tokens: int) -> Any:
        """The session that runs a step of `tokens` tokens per row: the prefill graph for prompt chunks."""
        return self.prefill_session if self.prefill_session is not None and tokens >= PREFILL_ROWS else self.session

    def _buffers(self, seq: int, need: int) -> _SeqKV:
        """The sequence's buffers, grown (keeping their contents) to hold `need` tokens."""
        kv = self.states.get(seq)
        capacity = kv.arrays[0].shape[2] if kv else 0
        if need <= capacity and kv is not None:
            return kv
        shape = (1, self.spec.num_kv_heads, kv_capacity(need), self.spec.head_dim)
        held: list[Any] = kv.arrays if kv is not None else []
        if kv is not None:
            kv.values.clear()  # the OrtValues and binding over the old arrays go: only `held` keeps them
            kv.binding = None
        arrays = []
        for layer in range(len(self.past_names)):  # one layer at a time: growing holds one old layer more
            arrays.append(np.zeros(shape, dtype=np.float32))
            if held:
                arrays[-1][:, :, :capacity] = held[layer]
                held[layer] = None
        values, binding = self._bind_in_place(arrays, self._last_value)
        kv = _SeqKV(arrays, values, binding)
        self.states[seq] = kv
        return kv

    def _run_in_place(self, ids: np.ndarray, kv: _SeqKV, total: int, keep: int = 1) -> np.ndarray:
        """One sequence's step with its buffers bound as past and present: the keys are written in place.

        Returns the logits of the last `keep` positions, [1, keep, V] (every position, [1, T, V], from
        an export without `logits_to_keep`). The [1, 1, V] array of keep=1 is reused by the next call."""
        if self._mask.shape[1] < total:
            self._mask = np.ones((1, max(total, 2 * self._mask.shape[1])), dtype=np.int64)
        session = self._session_for(ids.shape[1])
        if session is not self.session:  # a prompt chunk: a binding of the prefill session's over the same buffers
            kv = _SeqKV(kv.arrays, kv.values, self._binding(session, kv.values, self._last_value))
        binding = kv.binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._mask[:, :total])
        preallocated = self.keeps_last and keep == 1
        if self.keeps_last and keep != kv.keep:  # the binding keeps its last choice between steps
            binding.bind_cpu_input(LOGITS_TO_KEEP, np.array([keep], dtype=np.int64))
            if keep == 1:
                binding.bind_ortvalue_output("logits", self._last_value)
            kv.keep = keep
        if not preallocated:
            binding.bind_output("logits")
        session.run_with_iobinding(binding)
        if preallocated:
            return self._last
        logits: np.ndarray = binding.get_outputs()[0].numpy()
        return logits

    def extend(self, seq: int, ids: Sequence[int], start: int, keep: int = 1) -> Tensor:
        """Run `ids` at positions start.. of sequence `seq`, outside the engine; logits of the last `keep`
        [keep, V]. Keys past `start` are overwritten, so a caller rolls a sequence back by passing an
        earlier start (speculative decoding drops rejected draft tokens this way). A [1, V] result is
        a view that the next call overwrites."""
        end = start + len(ids)
        self._touch(seq)
        logits = self._run_in_place(np.asarray([ids], dtype=np.int64), self._buffers(seq, end), end, keep)
        return torch.from_numpy(logits[0, -keep:])

    def rewind(self, seq: int, length: int) -> None:
        """The engine dropped `seq`'s keys after its first `length` tokens: later runs write over them."""
        self.lengths[seq] = length

    def forget(self, seq: int) -> None:
        """Free a sequence's buffers: extend's counterpart, and the engine's cache calls it as it frees a
        sequence's blocks."""
        self._drop(seq)
        self.lengths.pop(seq, None)
        self.published.pop(seq, None)

    def logits_all(self, ids: Sequence[int]) -> Tensor:
        """Logits [T, V] at every position of one sequence, with no cache kept."""
        logits, _ = self._run(np.asarray([list(ids)], dtype=np.int64), self._empty(1))
        return torch.from_numpy(logits[0])

    def __call__(self, tokens: Tensor, logits: str = "last") -> Tensor:
        """Logits of whole sequences with no cache kept ([B, V], or [B, T, V] with logits="all");
        token counts are the rows' full widths."""
        every = [self.logits_all(row.tolist()) for row in tokens]
        if logits == "all":
            return torch.stack(every)
        return torch.stack([x[-1] for x in every])

    def step(self, tokens: np.ndarray, cache: PagedKVCache, num_tokens: Sequence[int],
             rows: Sequence[int], every: bool = False) -> np.ndarray:
        """The engine's call: row i appends tokens[i, :num_tokens[i]] to sequence rows[i]; logits after
        each row's last token [B, V] (with `every`, one row's logits at each of its tokens, [n, V]). numpy
        in and out, so a decode step touches no torch (the engine's _forward says why). At batch 1 the
        result is a view that the next call overwrites."""
        assert not every or len(rows) == 1, "logits at every position are kept for one row at a time"
        # (finished, cancelled and preempted sequences are gone already: the cache's on_free calls forget)
        seqs = cache.seqs  # the paged cache's block tables (the length of each)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        starts: list[int] = []
        for i, row in enumerate(rows):
            start = seqs[row].length
            if start and start != self.lengths.get(row, 0):  # the engine attached cached prefix blocks
                self._restore(row, start, cache)
            elif not start:
                self.published.pop(row, None)  # restarted from 0 (preemption): nothing of it is published
            self.lengths[row] = start
            starts.append(start)
            # every decode row runs in one batch, each at its own position; prompt chunks from position 0
            # batch by width; a prompt chunk over a past (a later chunk, or a prompt after cached prefix
            # blocks) runs alone: GroupQueryAttention takes no batch of those
            n = num_tokens[i]
            groups[(1,) if n == 1 else (n,) if start == 0 else (n, -1 - i)].append(i)
        cache.advance(rows, num_tokens)  # (raises before any work if unreserved)
        # batch 1 returns a view, not a [1, V] copy (a fresh 196 kB buffer per step costs page faults);
        # the engine reads these logits before its next call overwrites them
        out = np.empty((len(rows), self.spec.vocab_size), dtype=np.float32) if len(rows) > 1 else None
        for (n, *_), members in groups.items():
            if len(members) == 1:  # one sequence: its buffers are the past and the present
                first = members[0]
                self._touch(rows[first])
                end = starts[first] + n
                keep = n if every else 1
                result = self._run_in_place(tokens[first : first + 1, :n], self._buffers(rows[first], end), end, keep)
                if every:
                    self.lengths[rows[first]] = end
                    return result[0, -n:]
            else:
                result = self._run_batch(tokens[members, :n], [rows[i] for i in members], [starts[i] for i in members])
            for j, i in enumerate(members):
                self.lengths[rows[i]] = starts[i] + n
                if out is None:
                    return result[:, -1]
                out[i] = result[j, -1]
        assert out is not None
        return out

    def _run_batch(self, ids: np.ndarray, seqs: list[int], starts: list[int]) -> np.ndarray:
        """Several sequences in one run, each appending ids' n tokens at its own position; last logits [B, 1, V].

        Prompt chunks (all from position 0) run on empty pasts and their keys and values are copied into
        each sequence's buffers. Decode rows run in place in a batch buffer (`_decode_batch`).
        """
        b, n = ids.shape
        if n == 1:
            return self._decode_batch(ids, seqs, starts)
        assert not any(starts), "prompt chunks over a past run one sequence at a time"
        logits, presents = self._run(ids, self._empty(b), last=True)
        for j, seq in enumerate(seqs):
            self._drop(seq)  # from position 0: nothing it held before counts
            for array, present in zip(self._buffers(seq, n).arrays, presents, strict=True):
                array[0, :, :n] = present[j]
        return logits

    def _decode_batch(self, ids: np.ndarray, seqs: list[int], starts: list[int]) -> np.ndarray:
        """One token for each of several sequences at their own positions, in one run.

        Their keys and values sit side by side in a batch buffer [B, Hkv, capacity, D] per layer, bound as
        both past and present, as a single sequence's are: GroupQueryAttention writes each row's new key
        at that row's length, which it reads from the attention mask's row sums (the builder's graph
        derives seqlens_k from them), so right padding is never attended. The buffer lives while the same
        sequences keep decoding and is their only copy; when the members change or it fills up, its rows
        move to a new one (`_regroup`). (Fresh pasts and presents per step cost 1.45x the step time at 16
        rows of 200 tokens here.)
        """
        batch = self._batch
        need = max(starts) + 1
        if batch is None or batch.seqs != seqs or batch.lengths != starts or batch.capacity < need:
            batch = self._regroup(seqs, starts, kv_capacity(need))
        mask = np.zeros((len(seqs), need), dtype=np.int64)
        for j, start in enumerate(starts):
            mask[j, : start + 1] = 1
        batch.binding.bind_cpu_input("input_ids", ids)
        batch.binding.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(batch.binding)
        batch.lengths = [start + 1 for start in starts]
        return batch.logits if self.keeps_last else batch.binding.get_outputs()[0].numpy()

    def _touch(self, seq: int) -> None:
        """`seq` is about to run outside the decode batch: move its keys and values to its own buffers."""
        batch = self._batch
        if batch is None or seq not in batch.seqs:
            return
        row = batch.seqs.index(seq)
        length = batch.lengths[row]
        for own, shared in zip(self._buffers(seq, length).arrays, batch.arrays, strict=True):
            own[0, :, :length] = shared[row, :, :length]
        self._leave_batch(seq)

    def _drop(self, seq: int) -> None:
        """Forget `seq`'s keys and values wherever they live."""
        self.states.pop(seq, None)
        self._leave_batch(seq)

    def _leave_batch(self, seq: int) -> None:
        """Take `seq`'s row out of the decode batch; the batch buffer goes with its last member."""
        batch = self._batch
        if batch is not None and seq in batch.seqs:
            batch.seqs[batch.seqs.index(seq)] = None
            if all(s is None for s in batch.seqs):
                self._batch = None

    def _regroup(self, seqs: list[int], starts: list[int], capacity: int) -> _BatchKV:
        """A new batch buffer for `seqs`, filled from the old one's rows and the others' own buffers, which
        are freed one layer at a time as they are copied: the move holds about one layer more, not a
        second cache. Members of the old batch that are not in the new one move to their own buffers."""
        old = self._batch
        if old is not None:
            for seq in [s for s in old.seqs if s is not None and s not in seqs]:
                self._touch(seq)
        old = self._batch  # None if _touch emptied it
        self._batch = None
        # per row: (its arrays per layer, its row in them); None for a one-token prompt, which has no past
        sources: list[tuple[list[Any], int] | None] = []
        for seq, start in zip(seqs, starts, strict=True):
            if old is not None and seq in old.seqs:
                row = old.seqs.index(seq)
                assert old.lengths[row] >= start, "a decode row lost keys and values"
                sources.append((old.arrays, row))
                continue
            kv = self.states.pop(seq, None)
            if kv is None:
                assert start == 0, "a decode row lost keys and values"
                sources.append(None)
                continue
            assert kv.arrays[0].shape[2] >= start, "a decode row lost keys and values"
            sources.append((kv.arrays, 0))
            kv.values.clear()  # the OrtValues and binding over its arrays go: only the list holds them
        if old is not None:
            old.values.clear()
            old.binding = None
        shape = (len(seqs), self.spec.num_kv_heads, capacity, self.spec.head_dim)
        arrays = []
        for layer in range(len(self.past_names)):
            array = np.zeros(shape, dtype=np.float32)
            for j, (source, start) in enumerate(zip(sources, starts, strict=True)):
                if source is not None:
                    array[j, :, :start] = source[0][layer][source[1], :, :start]
            for source in sources:
                if source is not None:
                    source[0][layer] = None  # freed here (the old batch's array once its last row is copied)
            arrays.append(array)
        logits = np.empty((len(seqs), 1, self.spec.vocab_size), dtype=np.float32)
        values, binding = self._bind_in_place(arrays, self._ort.OrtValue.ortvalue_from_numpy(logits))
        self._batch = _BatchKV(list(seqs), list(starts), arrays, values, binding, logits)
        return self._batch

    def _bind_in_place(self, arrays: list[np.ndarray], logits: Any) -> tuple[list[Any], Any]:
        """(OrtValues over `arrays`, an IO binding with them as both past and present). With logits_to_keep
        the last position's logits go to the OrtValue `logits`; an older export's come back as an output."""
        values = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        return values, self._binding(self.session, values, logits)

    def _binding(self, session: Any, values: list[Any], logits: Any) -> Any:
        """An IO binding of `session` with `values` as both past and present (see _bind_in_place)."""
        binding = session.io_binding()
        # logits first: get_outputs() lists outputs in the order they were first bound
        if self.keeps_last:
            binding.bind_cpu_input(LOGITS_TO_KEEP, self._one)
            binding.bind_ortvalue_output("logits", logits)
        else:
            binding.bind_output("logits")
        for name, value in zip(self.past_names, values, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.present_names, values, strict=True):
            binding.bind_ortvalue_output(name, value)
        return binding


def export_path(loaded: LoadedModel, precision: str = "auto") -> Path:
    """Where onnx_folder finds (or builds) the ONNX export of `loaded`: $KILN_CACHE/onnx by sha256 and precision.

    Never the model's own folder, even where it holds a model.onnx: kiln does not load an export folder
    as a model (model/source.py refuses one), so such a file is another tool's graph, of other inputs,
    weights and precision, and running it would answer with a model the user did not name.

    The name is a hash of the weights and of the config the builder is handed (write_hf_folder): an edited
    config.json (rope_theta, the norm's epsilon) beside the same weights ran the export built before it."""
    config = json.dumps(loaded.spec.to_hf_config(), sort_keys=True)
    key = hashlib.sha256(f"{loaded.sha256}\n{config}".encode()).hexdigest()[:16]
    return settings.cache_dir() / "onnx" / f"{key}-{precision}-v{EXPORT_VERSION}"


def has_export(loaded: LoadedModel, precision: str = "auto") -> bool:
    """Whether onnx_folder would find the export already built, whole (and so read none of kiln's weights)."""
    return export_problem(export_path(loaded, precision)) is None


def onnx_folder(loaded: LoadedModel, precision: str = "auto") -> Path:
    """The ONNX export of `loaded`, built once and cached under $KILN_CACHE/onnx by sha256 and precision."""
    from kiln.artifact.onnx_export import export

    folder = export_path(loaded, precision)
    if export_problem(folder) is None:
        return folder
    try:  # before the build (half a minute and more), which failed only at its last step
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = folder.with_name(folder.name + ".lock").open("a")
    except OSError as exc:
        raise InvalidParameterError(f"cannot make the ONNX export cache {folder.parent} ({exc.strerror}); set "
                                    "KILN_CACHE to a writable folder") from exc
    with lock:
        # one build per export at a time: two processes that both built it replaced each other's folder,
        # the second under the first's loading session (or failed to, its target no longer empty)
        if not _try_lock(lock):
            print(f"kiln: waiting for another kiln process building the ONNX export in {folder}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        problem = export_problem(folder)  # that process's export, if it was building this one
        if problem is None:
            return folder
        if folder.exists():  # cut short, or changed since: ONNX Runtime would load whatever it holds
            print(f"kiln: the cached ONNX export {folder} is not whole ({problem}); building it again",
                  file=sys.stderr)
        else:
            print(f"kiln: building the ONNX export of {loaded.source.name} for the onnxruntime runtime (once; "
                  f"cached in {folder.parent})", file=sys.stderr)
        export(loaded, folder, precision)  # type: ignore[arg-type]
    return folder


def _try_lock(lock: IO[str]) -> bool:
    """Take an exclusive lock on the open file `lock` if no other holds it; True if taken."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def why_not_onnx(loaded: LoadedModel, kv_cache: str = "model") -> str | None:
    """Why `--runtime auto` keeps `loaded` on kiln's torch graph, or None when onnxruntime should run it.

    onnxruntime runs every fp32 model it takes faster than kiln's graph does (the default model, `kiln
    bench`, BENCHMARKS.md): int8 / int4 weight-only artifacts by far, because MatMulNBits reads their
    integers where the torch runtime widens every matrix on every call (batch-1 decode: int8 3.5x, int4
    10-12x), and the uncompressed model too (1.5x at batch 1, 1.6x over 16 sequences, prefill no slower).
    What stays on kiln's graph, the reference that supports every feature: bf16 (oneDNN's AMX matmuls,
    which ONNX Runtime's CPU kernels do not use), int8 keys and values, W8A8 and low-rank layers (the
    export would run them as other arithmetic), and head sizes ONNX Runtime's attention refuses.
    """
    from kiln.compress.quantize.qlinear import LowRankLinear, W8A8Linear

    if any(isinstance(m, (W8A8Linear, LowRankLinear)) for m in loaded.model.modules()):
        return "W8A8 or low-rank layers, which the ONNX export would run as other arithmetic"
    if loaded.model.dtype != torch.float32:
        return "--dtype bf16"
    if kv_cache != "model":
        return f"--kv-cache {kv_cache}"
    if loaded.spec.head_dim % 16:
        return f"head size {loaded.spec.head_dim}, which ONNX Runtime's attention does not take"
    try:
        import onnxruntime_genai  # noqa: F401  (the export's builder)
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'lmkiln[onnx]')"
    return None


def no_room_for_onnx(loaded: LoadedModel, share: float = 0.5, keep_weights: bool = True) -> str | None:
    """Why the session's own copy of the weights should not be made, or None when it fits.

    Where the caller keeps kiln's graph (pick_runtime's keep_weights), the session is a second copy of the
    weights beside `loaded`'s, and the export made on first use holds its own while `loaded` is still
    there: little for an int4 artifact, the whole model again for an fp32 one (the default model: about
    0.7 GB more resident). It is made only while it fits in `share` of the memory available now; where that is
    unknown (0), it is made. With keep_weights=False and the export already built, kiln's weights go before
    the session loads (_build), so the one copy resident then is weighed against the memory available
    plus what they free; an export still to be built reads kiln's weights as it writes, so that case is
    weighed as two copies.
    """
    from kiln.artifact.onnx_export import plan_for
    from kiln.benchmark.latency import model_bytes

    mine, free = model_bytes(loaded), available_bytes()
    if not free:
        return None
    # an int4 export's prefill graph is a second session over the same weights with the layers in 8-bit blocks
    # (write_prefill_graph): about twice the int4 copy again
    copy = mine * (3 if plan_for(loaded, "auto").precision == "int4" and settings.ort_prefill_graph() else 1)
    if not keep_weights and has_export(loaded):
        room = free + mine  # kiln's weights (model_bytes again) are released before the session loads
        if copy > share * room:
            return (f"its onnxruntime copy of the weights ({copy / 2**20:.0f} MB) would take more than "
                    f"{share:.0%} of the memory available once kiln's own copy is released ({room / 2**20:.0f} MB)")
        return None
    if copy > share * free:
        return (f"its onnxruntime copy of the weights ({copy / 2**20:.0f} MB) would take more than "
                f"{share:.0%} of the memory available ({free / 2**20:.0f} MB)")
    return None


def pick_runtime(loaded: LoadedModel, runtime: str, kv_cache: str = "model",
                 keep_weights: bool = True) -> tuple[object, str]:
    """(the model the engine should call, the runtime it is) for `--runtime` (auto resolved per model).

    keep_weights=False: the caller needs nothing of kiln's graph once an ONNX Runtime session runs the
    model (generate, chat, bench, serve), so kiln's copy of the weights goes before the session loads
    its own, and the two are never resident together."""
    if runtime not in RUNTIMES:
        raise InvalidParameterError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and kv_cache != "model":
        # the session keeps its own keys and values at the model's dtype: the flag was ignored without a word
        raise InvalidParameterError(f"--kv-cache {kv_cache} runs on kiln's torch graph only (ONNX Runtime keeps its "
                                    f"own keys and values); pass --runtime torch or drop --kv-cache {kv_cache}")
    if runtime != "auto":
        return runtime_model(loaded, runtime, keep_weights=keep_weights), runtime
    if why_not_onnx(loaded, kv_cache) is None:
        short = no_room_for_onnx(loaded, keep_weights=keep_weights)
        if short:  # the user would expect onnxruntime here: say why it is torch
            print(f"kiln: running {loaded.source.name} on torch: {short}; --runtime onnxruntime forces it",
                  file=sys.stderr)
            return runtime_model(loaded, "torch"), "torch"
        try:
            return runtime_model(loaded, "onnxruntime", keep_weights=keep_weights), "onnxruntime"
        except KilnError as exc:  # an export that fails its check: kiln's own graph still runs the artifact
            if loaded.weights_released:  # unless they went before a session that then failed to load
                raise
            print(f"kiln: the onnxruntime runtime is not available for this model ({exc}); running it on torch",
                  file=sys.stderr)
    return runtime_model(loaded, "torch"), "torch"


def runtime_model(loaded: LoadedModel, runtime: str, precision: str = "auto", keep_weights: bool = True) -> object:
    """The model the engine should call for `runtime`, with the calling thread's torch count set for it.

    The count is set for every runtime, so a process that runs an ONNX Runtime model and then a torch one
    on the same thread (kiln bench over several artifacts) gives the torch one its cores back.
    """
    if runtime not in RUNTIMES:
        raise InvalidParameterError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return pick_runtime(loaded, runtime, keep_weights=keep_weights)[0]
    model = _build(loaded, runtime, precision, keep_weights)
    use_threads_for(model)
    return model


def _build(loaded: LoadedModel, runtime: str, precision: str, keep_weights: bool = True) -> object:
    if runtime == "torch":
        return loaded.model
    if runtime == "torch-compiled":
        from kiln.engine.compiled import compile_decode

        if not compile_decode(loaded.model) or loaded.model.dtype != torch.float32:
            # nothing wrong, but nothing compiled either: say so rather than let the flag look like it worked
            print("kiln: --runtime torch-compiled compiles int8 / int4 layers at fp32 only; this model has "
                  "none to compile, so it runs as --runtime torch", file=sys.stderr)
        return loaded.model
    if loaded.model.dtype != torch.float32:
        raise InvalidParameterError(
            "--runtime onnxruntime runs its export's own precision from the fp32 model; drop --dtype bf16"
        )
    folder = onnx_folder(loaded, precision)  # the export, if not cached yet, reads kiln's weights
    if not keep_weights:
        # before the session loads its copy: the default fp32 model's peak is then one copy, not two
        loaded.release_weights()
    # ORT's pool gets the process's cores even when this thread's torch count was narrowed before
    return OnnxModel(folder, loaded.spec, PROCESS_THREADS)
