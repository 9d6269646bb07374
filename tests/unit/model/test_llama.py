"""kiln's graph against transformers on tiny random-init models of every supported variant."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kiln.errors import ModelFormatError
from kiln.model.llama import build_model
from kiln.model.spec import ModelSpec

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=256)

VARIANTS = {
    "llama-mha": (LlamaForCausalLM, LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa2": (LlamaForCausalLM, LlamaConfig(**BASE, num_attention_heads=8, num_key_value_heads=4)),
    "llama-gqa4-tied": (
        LlamaForCausalLM,
        LlamaConfig(**BASE, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama-mqa": (LlamaForCausalLM, LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=1)),
    "llama-head-dim": (
        LlamaForCausalLM,
        LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    ),
    "llama3-rope-scaling": (
        LlamaForCausalLM,
        LlamaConfig(
            **BASE, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        ),
    ),
    "llama-linear-rope": (
        LlamaForCausalLM,
        LlamaConfig(**BASE, num_attention_heads=4, num_key_value_heads=2,
                    rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "qwen2-qkv-bias-untied": (
        Qwen2ForCausalLM,
        Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "mistral-sliding-window": (
        MistralForCausalLM,
        MistralConfig(**BASE, num_attention_heads=4, num_key_value_heads=1, sliding_window=6),
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request: pytest.FixtureRequest):
    cls, config = VARIANTS[request.param]
    torch.manual_seed(hash(request.param) % 1000)
    hf = cls(config).eval()
    if request.param.startswith("qwen2"):  # random init leaves biases at zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    spec = ModelSpec.from_hf_config(hf.config.to_dict())
    return hf, build_model(spec, hf.state_dict(), torch.float32)


def test_spec_reads_variant(pair) -> None:
    hf, ours = pair
    assert ours.spec.num_parameters == sum(p.numel() for p in hf.parameters())


@torch.inference_mode()
def test_full_forward_matches_reference(pair) -> None:
    hf, ours = pair
    tokens = torch.randint(0, VOCAB, (2, 24))
    ref = hf(tokens).logits
    got = ours(tokens, logits="all")
    assert (ref - got).abs().max().item() < 1e-4


@torch.inference_mode()
def test_cached_prefill_then_decode_matches_reference(pair) -> None:
    hf, ours = pair
    tokens = torch.randint(0, VOCAB, (2, 24))
    ref = hf(tokens).logits
    cache = ours.new_cache(batch_size=2, max_len=32)
    parts = [ours(tokens[:, :10], cache, logits="all")]
    parts += [ours(tokens[:, i : i + 1], cache, logits="all") for i in range(10, 24)]
    assert cache.lengths == [24, 24]
    assert (ref - torch.cat(parts, dim=1)).abs().max().item() < 1e-4


@torch.inference_mode()
def test_rows_at_different_lengths_match_each_alone(pair) -> None:
    hf, ours = pair
    lengths = [21, 9, 15]
    tokens = torch.randint(0, VOCAB, (3, 21))
    cache = ours.new_cache(batch_size=3, max_len=32)
    prefill = ours(tokens, cache, num_tokens=lengths)  # right-padded rows, last real token's logits
    nxt = torch.randint(0, VOCAB, (3, 1))
    step = ours(nxt, cache)  # one decode step, each row at its own position
    for i, n in enumerate(lengths):
        alone = hf(tokens[i : i + 1, :n]).logits[0, -1]
        assert (alone - prefill[i]).abs().max().item() < 1e-4
        alone_next = hf(torch.cat([tokens[i : i + 1, :n], nxt[i : i + 1]], dim=1)).logits[0, -1]
        assert (alone_next - step[i]).abs().max().item() < 1e-4


@torch.inference_mode()
def test_decode_on_a_subset_of_rows(pair) -> None:
    hf, ours = pair
    tokens = torch.randint(0, VOCAB, (3, 12))
    cache = ours.new_cache(batch_size=3, max_len=16)
    ours(tokens, cache)
    nxt = torch.randint(0, VOCAB, (1, 1))
    got = ours(nxt, cache, rows=[2])
    assert cache.lengths == [12, 12, 13]
    ref = hf(torch.cat([tokens[2:3], nxt], dim=1)).logits[0, -1]
    assert (ref - got[0]).abs().max().item() < 1e-4


@torch.inference_mode()
def test_bf16_stays_close_to_fp32(pair) -> None:
    hf, ours = pair
    spec = ours.spec
    low = build_model(spec, hf.state_dict(), torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, 16))
    full = ours(tokens, logits="all")
    half = low(tokens, logits="all").float()
    assert low.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(full.flatten(), half.flatten(), dim=0) > 0.99


def test_mismatched_weights_are_refused() -> None:
    cls, config = VARIANTS["llama-gqa2"]
    hf = cls(config)
    spec = ModelSpec.from_hf_config({**hf.config.to_dict(), "intermediate_size": 96})
    with pytest.raises(ModelFormatError, match="does not match the weights"):
        build_model(spec, hf.state_dict(), torch.float32)


def test_missing_weight_is_named() -> None:
    cls, config = VARIANTS["llama-gqa2"]
    hf = cls(config)
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        build_model(ModelSpec.from_hf_config(hf.config.to_dict()), state, torch.float32)
