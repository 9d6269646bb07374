"""ModelSpec from Hugging Face configs: variants, refusals, and the config round trip."""

from __future__ import annotations

import pytest

from kiln.errors import ModelFormatError, UnsupportedArchitectureError
from kiln.model.spec import ModelSpec

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "tie_word_embeddings": True, "eos_token_id": [5, 7],
}


def test_llama_config_is_read() -> None:
    spec = ModelSpec.from_hf_config(LLAMA)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (8, 2, 8)
    assert spec.eos_token_ids == (5, 7)
    assert spec.tie_embeddings and not spec.qkv_bias and spec.sliding_window is None


def test_transformers4_rope_layout_is_read() -> None:
    cfg = {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope_theta == 500000.0
    assert (spec.rope_scaling.kind, spec.rope_scaling.factor) == ("linear", 2.0)


def test_qwen2_defaults_to_qkv_bias_and_ignores_disabled_window() -> None:
    cfg = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 32,
           "use_sliding_window": False}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.qkv_bias and spec.sliding_window is None


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelSpec.from_hf_config({**LLAMA, "architectures": ["GPT2LMHeadModel"]})


def test_unsupported_rope_scaling_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        ModelSpec.from_hf_config({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_field_is_named() -> None:
    cfg = {k: v for k, v in LLAMA.items() if k != "hidden_size"}
    with pytest.raises(ModelFormatError, match="hidden_size"):
        ModelSpec.from_hf_config(cfg)


def test_heads_must_divide() -> None:
    with pytest.raises(ModelFormatError, match="not a multiple"):
        ModelSpec.from_hf_config({**LLAMA, "num_key_value_heads": 3})


def test_round_trip_through_hf_config() -> None:
    spec = ModelSpec.from_hf_config(
        {**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 128}}
    )
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_kv_bytes_per_token() -> None:
    spec = ModelSpec.from_hf_config(LLAMA)
    assert spec.kv_bytes_per_token(4) == 2 * 2 * 2 * 8 * 4


@pytest.mark.parametrize("key,value", [
    ("num_attention_heads", 0), ("num_key_value_heads", -2), ("num_hidden_layers", -3), ("hidden_size", 0),
    ("vocab_size", 0), ("intermediate_size", -1), ("max_position_embeddings", 0), ("head_dim", -8),
])
def test_counts_must_be_positive(key: str, value: int) -> None:
    # zero heads raised ZeroDivisionError; negative layers planned a smaller model with exit 0
    with pytest.raises(ModelFormatError, match=rf"{key} = {value} is not a positive count; fix the model's config"):
        ModelSpec.from_hf_config({**LLAMA, key: value})


@pytest.mark.parametrize("key,value,shown", [
    ("num_hidden_layers", True, "true"), ("hidden_size", 64.5, "64.5"), ("num_key_value_heads", True, "true"),
    ("max_position_embeddings", 511.9, "511.9"),
])
def test_a_count_that_is_not_a_whole_number_is_refused(key: str, value: object, shown: str) -> None:
    # true was read as 1 (a model of one layer planned with exit 0) and 64.5 as 64
    with pytest.raises(ModelFormatError, match=rf"config.json has {key}={shown}, which is not a whole number"):
        ModelSpec.from_hf_config({**LLAMA, key: value})
    spec = ModelSpec.from_hf_config({**LLAMA, "num_hidden_layers": 2.0, "head_dim": 0, "num_key_value_heads": None})
    assert (spec.num_layers, spec.head_dim, spec.num_kv_heads) == (2, 8, 8)


def test_an_architecture_written_without_its_list_is_read() -> None:
    # it was read letter by letter: "architecture 'L' is not supported"
    assert ModelSpec.from_hf_config({**LLAMA, "architectures": "LlamaForCausalLM"}).architecture == "LlamaForCausalLM"
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'GPT2LMHeadModel' is not supported"):
        ModelSpec.from_hf_config({**LLAMA, "architectures": "GPT2LMHeadModel"})


@pytest.mark.parametrize("cfg,says", [
    ({k: v for k, v in LLAMA.items() if k != "num_hidden_layers"}, "config.json lacks 'num_hidden_layers'; re-export"),
    ({**LLAMA, "hidden_size": "abc"}, "config.json has a bad value (invalid literal for int() with base 10: 'abc'); "),
])
def test_a_missing_or_bad_config_value_reads_as_one_sentence(cfg: dict[str, object], says: str) -> None:
    # "is missing or has a bad value for invalid literal for int() ..." said neither which nor why
    with pytest.raises(ModelFormatError) as info:
        ModelSpec.from_hf_config(cfg)
    assert str(info.value).startswith(says)
