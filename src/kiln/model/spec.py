"""ModelSpec: the shape of a Llama-family model, read from a Hugging Face config or a GGUF header.

It is all kiln needs to build the graph, size the KV cache and plan memory; it holds no weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from kiln.errors import InvalidParameterError, ModelFormatError, UnsupportedArchitectureError

# Hugging Face architecture name -> model_type. Everything else is refused with this list.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
RopeKind = Literal["default", "linear", "llama3"]
# ModelSpec's counts and the config.json keys they come from, each at least 1
COUNTS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
          "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
          "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "max_position": "max_position_embeddings"}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (none, linear position interpolation, or Llama 3's)."""

    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters of one decoder-only Llama-family model."""

    architecture: str  # a key of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int  # context length in tokens
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    sliding_window: int | None = None  # keys older than this many positions are masked
    sliding_layers: tuple[bool, ...] = ()  # per layer: does the window apply (empty = all layers)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {self.architecture!r} is not supported; kiln runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        for name, key in COUNTS.items():
            value = getattr(self, name)
            if value < 1:  # zero heads divided by zero below; negative layers planned a smaller model
                raise ModelFormatError(f"{key} = {value} is not a positive count; fix the model's config "
                                       "(config.json or the GGUF header)")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; fix the model's config.json"
            )

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_layers[layer] if self.sliding_layers else True

    @property
    def num_parameters(self) -> int:
        """Parameter count, counting a tied embedding once."""
        h, d = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q_out + 2 * kv_out) + q_out * h
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head

    def matmul_flops_per_token(self, position: int) -> float:
        """Matmul FLOPs of one prompt token at `position`: every weight but the embedding lookup and the
        head (the engine computes logits for the last position only), plus attention over the keys before it."""
        matmul_params = self.num_parameters - self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return 2 * matmul_params + 4 * self.num_layers * self.num_heads * self.head_dim * position

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """KV-cache bytes one token occupies across all layers (keys and values)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        arch = _architecture(cfg)
        try:
            num_heads = _count(cfg, "num_attention_heads")
            hidden = _count(cfg, "hidden_size")
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            layers = _count(cfg, "num_hidden_layers")
            window, sliding_layers = _sliding_window(cfg, layers)
            return cls(
                architecture=arch,
                vocab_size=_count(cfg, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_count(cfg, "intermediate_size"),
                num_layers=layers,
                num_heads=num_heads,
                num_kv_heads=_count(cfg, "num_key_value_heads", num_heads, zero_is_unset=True),
                head_dim=_count(cfg, "head_dim", hidden // num_heads if num_heads > 0 else 0,
                                zero_is_unset=True),
                max_position=_count(cfg, "max_position_embeddings", 2048),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=_rope_scaling(rope),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                sliding_window=window,
                sliding_layers=sliding_layers,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_int_tuple(cfg.get("eos_token_id")),
            )
        except KeyError as exc:
            raise ModelFormatError(
                f"config.json lacks {exc}; re-export the model with transformers' save_pretrained"
            ) from exc
        except (TypeError, ValueError) as exc:  # a value of the wrong type: the message quotes it
            raise ModelFormatError(
                f"config.json has a bad value ({exc}); re-export the model with transformers' save_pretrained"
            ) from exc

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict transformers can load (used for caches, artifacts and tests)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_scaling.kind}
        if self.rope_scaling.kind != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.kind == "llama3":
            rope.update(
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position,
            )
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (
                self.eos_token_ids[0] if self.eos_token_ids else None
            ),
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if self.sliding_window is not None:
            cfg["sliding_window"] = self.sliding_window
            if self.model_type == "qwen2":
                cfg["use_sliding_window"] = True
        return cfg


def int8_block(spec: ModelSpec) -> int:
    """MatMulNBits block size for a kiln int8 artifact: the largest of 64, 32, 16 that divides every matmul's
    input size.

    kiln's int8 is one scale per output row, so any block size carries it exactly (the row's scale is
    repeated per block). Larger blocks mean fewer scales to read and, at accuracy level 4, coarser
    int8 rounding of the activations: on the default model 64 instead of 32 decoded 12.7% faster
    (121.3 against 107.6 tok/s, a bare loop of session runs) at the same wikitext2 perplexity on 12
    chunks (26.90 both; 26.73 with the torch runtime's fp32 activations). It lives beside the shape it
    reads so that the memory plan (kiln.plan.memory) sizes the same blocks the export
    (kiln.artifact.onnx_export) writes without importing the exporter (torch, the builder).
    """
    sizes = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.intermediate_size)
    for block in (64, 32, 16):
        if all(k % block == 0 for k in sizes):
            return block
    raise InvalidParameterError(f"ONNX Runtime's int8 kernels need matrix input sizes that are multiples of 16, and "
                                f"this model's are {', '.join(map(str, sizes))}; run it with --runtime torch")


def _count(cfg: dict[str, Any], key: str, default: int | None = None, zero_is_unset: bool = False) -> int:
    """cfg[key] as a whole number, `default` where it is missing or null (or 0 with zero_is_unset, as for a
    head_dim or num_key_value_heads of 0). true was read as 1 (a model of one layer planned without a word)
    and 30.5 as 30."""
    value = cfg.get(key)
    if value is None or zero_is_unset and value == 0 and not isinstance(value, bool):
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ModelFormatError(f"config.json has {key}={json.dumps(value)}, which is not a whole number; "
                               "fix the model's config.json")
    return int(value)


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):  # a name written without its list was read letter by letter ("'L' is not supported")
        archs = [archs]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return str(arch)
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    if not archs and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    name = archs[0] if archs else cfg.get("model_type", "unknown")
    raise UnsupportedArchitectureError(
        f"architecture {name!r} is not supported; kiln runs {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(Llama 2/3, Mistral, Qwen2, SmolLM)"
    )


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"RoPE scaling {kind!r} is not supported; kiln supports default, linear and llama3"
        )
    if kind == "default":
        return RopeScaling()
    return RopeScaling(
        kind=cast(RopeKind, kind),
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(cfg: dict[str, Any], num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = cfg.get("sliding_window")
    if window is None or (cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window")):
        return None, ()
    layer_types = cfg.get("layer_types")
    if layer_types and len(layer_types) == num_layers:
        flags = tuple(t == "sliding_attention" for t in layer_types)
        return (int(window), flags) if any(flags) else (None, ())
    return int(window), ()


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)

