"""kiln's own graph for the Llama family: Llama 2/3, Mistral, Qwen2, SmolLM.

One module, top-down: RMSNorm, rotary embedding (with linear and Llama-3 scaling), grouped-query
attention over a KV cache, SwiGLU MLP, the decoder block and the model. It is written by hand because
it is the product's core: batched rows at different lengths, quantized and pruned layers and ONNX
export with an explicit cache all need a graph we own. transformers stays the loader (GGUF and
Hugging Face folders) and the correctness oracle: tests compare these logits with its LlamaForCausalLM.
q/k/v and gate/up are stored fused (one matmul each) because the decode step is launch-bound.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.errors import ModelFormatError
from kiln.model.kv_cache import AttentionBatch, KVCache, StaticKVCache, uncached_batch
from kiln.model.spec import ModelSpec

LogitsMode = Literal["last", "all"]
PREFILL_CHUNK_TOKENS = 512  # bounds the attention scores of one forward pass


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as the reference does (arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(spec: ModelSpec) -> Tensor:
    """Inverse rotary frequencies [head_dim / 2] in fp32, with the same float ops as the reference."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = spec.rope_scaling
    if s.kind == "linear":
        return inv / s.factor
    if s.kind == "llama3":  # Llama 3.1: stretch low frequencies, keep high ones, blend between
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention; q, k and v come out of one fused projection."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.sliding = spec.is_sliding(layer)
        qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, qkv_out, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def mix(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch, cache: KVCache | None
    ) -> Tensor:
        """The attention heads' outputs [B, T, H * D], before o_proj."""
        b, t, _ = x.shape
        h, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(b, t, h + 2 * hkv, self.head_dim).transpose(1, 2)  # [B, H+2Hkv, T, D]
        qk = qkv[:, : h + hkv]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys at once
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, h + hkv :]
        if cache is not None:
            k, v = cache.update(self.layer, k, v, batch)  # [B, Hkv, S, D]
        mask = batch.sliding_mask if self.sliding and batch.sliding_mask is not None else batch.mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and batch.causal, enable_gqa=hkv != h
        )  # [B, H, T, D]
        return out.transpose(1, 2).reshape(b, t, h * self.head_dim)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch, cache: KVCache | None
    ) -> Tensor:
        return self.o_proj(self.mix(x, cos, sin, batch, cache))


class MLP(nn.Module):
    """SwiGLU feed-forward (arXiv 2002.05202); gate and up come out of one fused projection."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def act(self, x: Tensor) -> Tensor:
        """The gated activation [..., intermediate], down_proj's input."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(x))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, layer)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch, cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, batch, cache)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaModel(nn.Module):
    """The decoder: embedding, blocks, final norm, language-model head (tied or not)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed: nn.Module = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head: nn.Module = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.tie_weights()
        self.cos_table = self.sin_table = torch.empty(0)
        if not self.norm.weight.is_meta:
            self._rope_table(torch.float32)

    def tie_weights(self) -> None:
        """Make the output head share the input embedding's matrix."""
        assert isinstance(self.embed, nn.Embedding) and isinstance(self.lm_head, nn.Linear)
        self.lm_head.weight = self.embed.weight

    def _rope_table(self, dtype: torch.dtype) -> None:
        # cos/sin for every position, [max_position, head_dim], as the reference computes them.
        positions = torch.arange(self.spec.max_position).float()
        freqs = positions[:, None] * rope_inv_freq(self.spec)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_table = emb.cos().to(dtype)
        self.sin_table = emb.sin().to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding may be stored quantized, the norms never are)."""
        return self.norm.weight.dtype

    def forward(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        num_tokens: Sequence[int] | None = None,
        rows: Sequence[int] | None = None,
        logits: LogitsMode = "last",
    ) -> Tensor:
        """Run `tokens` [B, T] (right-padded to num_tokens per row) and return logits.

        With a cache, row i appends its tokens to cache row rows[i] at that row's current length.
        logits="last" gives [B, V] for each row's last real token; "all" gives [B, T, V].
        """
        hidden, last_index = self.hidden_states(tokens, cache, num_tokens, rows)
        if logits == "last":
            hidden = hidden[torch.arange(tokens.shape[0]), last_index]  # [B, hidden]
        return self.lm_head(hidden)

    def hidden_states(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        num_tokens: Sequence[int] | None = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Final-norm hidden states [B, T, hidden] and each row's last real index [B].

        For callers that need logits at only some positions (perplexity scores half of each chunk).
        """
        b, t = tokens.shape
        counts = list(num_tokens) if num_tokens is not None else [t] * b
        batch = uncached_batch(counts, t, self.spec.sliding_window) if cache is None else cache.begin(counts, t, rows)
        cos = self.cos_table[batch.positions].unsqueeze(1)  # [B, 1, T, D]
        sin = self.sin_table[batch.positions].unsqueeze(1)
        x = self.embed(tokens).to(self.dtype)  # [B, T, hidden]; a quantized embedding gives fp32 rows
        for layer in self.layers:
            x = layer(x, cos, sin, batch, cache)
        if cache is not None:
            cache.commit(batch)
        return self.norm(x), batch.last_index

    def prefill(
        self, cache: KVCache, prompts: Sequence[Sequence[int]], rows: Sequence[int],
        chunk_tokens: int = PREFILL_CHUNK_TOKENS,
    ) -> Tensor:
        """Append prompts[i] to cache row rows[i], in chunks that bound attention memory.

        Returns the logits [n, V] at each prompt's last token (the prediction of what follows).
        """
        out = torch.empty(len(prompts), self.spec.vocab_size, dtype=self.dtype)
        for begin in range(0, max(len(p) for p in prompts), chunk_tokens):
            part = [i for i, p in enumerate(prompts) if len(p) > begin]
            pieces = [prompts[i][begin : begin + chunk_tokens] for i in part]
            tokens = torch.zeros(len(part), max(len(c) for c in pieces), dtype=torch.long)
            for j, c in enumerate(pieces):
                tokens[j, : len(c)] = torch.tensor(list(c))
            logits = self(tokens, cache, num_tokens=[len(c) for c in pieces], rows=[rows[i] for i in part])
            out[torch.tensor(part)] = logits
        return out

    def new_cache(self, batch_size: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.spec, batch_size, max_len, self.dtype)


# --- weights: Hugging Face names <-> this graph -------------------------------------------------


def weight_map(spec: ModelSpec) -> list[tuple[str, tuple[str, ...]]]:
    """Each parameter of this graph and the Hugging Face tensors concatenated (dim 0) to make it."""
    names: list[tuple[str, tuple[str, ...]]] = [("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(spec.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        names.append((p + "attn.qkv_proj.weight", tuple(q + f"self_attn.{n}_proj.weight" for n in "qkv")))
        if spec.qkv_bias:
            names.append((p + "attn.qkv_proj.bias", tuple(q + f"self_attn.{n}_proj.bias" for n in "qkv")))
        names += [
            (p + "attn.o_proj.weight", (q + "self_attn.o_proj.weight",)),
            (p + "mlp.gate_up_proj.weight", (q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight")),
            (p + "mlp.down_proj.weight", (q + "mlp.down_proj.weight",)),
            (p + "input_norm.weight", (q + "input_layernorm.weight",)),
            (p + "post_attn_norm.weight", (q + "post_attention_layernorm.weight",)),
        ]
    names.append(("norm.weight", ("model.norm.weight",)))
    if not spec.tie_embeddings:
        names.append(("lm_head.weight", ("lm_head.weight",)))
    return names


def storage_layout(tensor: Tensor) -> Tensor:
    """Matrices are kept as the transpose of a contiguous [in, out] array: F.linear then hands the
    BLAS a non-transposed operand, which measured about 10% faster at batch 1-8 on this CPU."""
    if tensor.dim() == 2:
        return tensor.t().contiguous().t()
    return tensor.contiguous()


def build_model(spec: ModelSpec, hf_state: MutableMapping[str, Tensor], dtype: torch.dtype) -> LlamaModel:
    """Build the graph from Hugging Face weights, checking every tensor's shape.

    Source tensors are taken out of `hf_state` as they are converted, so peak memory stays near
    one copy of the weights.
    """
    with torch.device("meta"):  # no random init: every parameter is assigned below
        model = LlamaModel(spec)
    expected = dict(model.state_dict())
    for name, sources in weight_map(spec):
        missing = [s for s in sources if s not in hf_state]
        if missing:
            raise ModelFormatError(
                f"weight {missing[0]!r} is missing from the model files; the checkpoint is incomplete"
            )
        parts = [hf_state.pop(s) for s in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        del parts
        if tensor.shape != expected[name].shape:
            raise ModelFormatError(
                f"weight {name} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected[name].shape)}; config.json does not match the weights"
            )
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(storage_layout(tensor.to(dtype)),
                                                                     requires_grad=False))
    if spec.tie_embeddings:
        model.tie_weights()
    model._rope_table(dtype)
    return model.eval()
