"""A tiny random Llama (GQA, 4 layers) for compression tests; no download, no tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.model.llama import LlamaModel, build_model
from kiln.model.spec import ModelSpec


def tiny_model(seed: int = 0, tie: bool = True) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    hf = LlamaForCausalLM(config)
    return build_model(ModelSpec.from_hf_config(hf.config.to_dict()), hf.state_dict(), torch.float32)


@pytest.fixture
def tiny() -> LlamaModel:
    return tiny_model()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(1))


def integral_zero_points(scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """-offset / scale per group, checked to be an integer in 0..15 as a reader recovers it (MatMulNBits' z)."""
    z = -offsets.double() / scales.double()
    assert (z - z.round()).abs().max() <= 1e-4 and z.round().min() >= 0 and z.round().max() <= 15
    return z.round()
