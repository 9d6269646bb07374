"""bf16 linear layers packed for oneDNN: same results as the plain layers, only where oneDNN supports bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.model.llama import build_model
from kiln.model.packed import PackedLinear, can_pack, pack_linears, packed_nbytes
from kiln.model.spec import ModelSpec

pytestmark = pytest.mark.skipif(not can_pack(torch.bfloat16), reason="this CPU has no oneDNN bf16 matmul")


def tiny(dtype: torch.dtype, tied: bool = True) -> tuple[LlamaForCausalLM, nn.Module]:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    return hf, build_model(ModelSpec.from_hf_config(hf.config.to_dict()), hf.state_dict(), dtype)


@torch.inference_mode()
def test_packed_layers_agree_with_plain_ones() -> None:
    hf, plain = tiny(torch.bfloat16)
    _, packed = tiny(torch.bfloat16)
    assert pack_linears(packed) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the head
    tokens = torch.randint(0, 96, (3, 12))
    want = plain(tokens, num_tokens=[12, 7, 3], logits="all").float()
    got = packed(tokens, num_tokens=[12, 7, 3], logits="all").float()
    reference = hf(tokens).logits  # fp32: the plain bf16 model's own error sets the scale
    assert (got - want).abs().max() <= 0.5 * (want - reference).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_only_plain_bf16_linears_are_packed() -> None:
    _, fp32 = tiny(torch.float32)
    assert pack_linears(fp32) == 0
    _, model = tiny(torch.bfloat16, tied=True)
    table = model.embed.weight
    pack_linears(model)
    assert isinstance(model.lm_head, PackedLinear) and model.embed.weight is table  # the lookup keeps its matrix
    assert not any(type(m) is nn.Linear for m in model.modules())
    matrices = 2 * (64 * (4 + 2 * 2) * 16 + 64 * 64 + 64 * 2 * 80 + 80 * 64) + 96 * 64
    assert packed_nbytes(model) == 2 * matrices
