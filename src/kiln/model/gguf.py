"""GGUF input: read and check a file's header, and dequantize it once into a cached Hugging Face folder.

The header alone gives a ModelSpec (for `kiln info` and `kiln plan`, no weights needed). The
dequantization is left to transformers, kiln's loader; kiln caches its result as safetensors +
config.json + tokenizer files under $KILN_CACHE/gguf/<sha256>/ so later loads take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import __version__, settings
from kiln.errors import InvalidParameterError, ModelFormatError, UnsupportedArchitectureError
from kiln.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec

# GGUF general.architecture -> Hugging Face architecture (Mistral GGUFs say "llama").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SOURCE_FILE = "kiln-source.json"


@dataclass
class GGUFHeader:
    spec: ModelSpec
    metadata: dict[str, Any]  # scalar key/values (token lists left out)
    tensor_types: Counter[str] = field(default_factory=Counter)  # e.g. {"Q4_1": 210, "F32": 61}
    num_parameters: int = 0


# What gguf-py raises on a damaged header: a bad type code, a duplicate key, text that is not UTF-8.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError)
_REFETCH = "download or copy it again, or export it again if kiln made it"


class _PastEnd(Exception):
    """Private sentinel: the reader needed bytes beyond the end of the file."""


def open_reader(path: Path) -> Any:
    """A gguf.GGUFReader over `path`, refusing a truncated or corrupt file in one line that names it.

    gguf-py slices its memory map without bounds checks, so a cut file surfaces as whichever numpy
    error the short slice happens to cause; every read goes through its `_get`, checked here instead."""
    import gguf  # deferred: its import is slow and only GGUF sources need it

    class CheckedReader(gguf.GGUFReader):  # type: ignore[misc]
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            import numpy as np

            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _PastEnd
            return super()._get(offset, dtype, count, override_order)

    try:
        return CheckedReader(path)
    except _PastEnd:
        raise ModelFormatError(
            f"GGUF file {path} is truncated or corrupt: it ends at byte {path.stat().st_size}, before the data "
            f"its header lists; {_REFETCH}"
        ) from None
    except _PARSE_ERRORS as exc:
        raise _corrupt(path) from exc


def _corrupt(path: Path) -> ModelFormatError:
    # gguf-py's own wording is left to --debug's traceback: it names its internals, not the problem
    return ModelFormatError(f"GGUF file {path} is corrupt (its header does not parse); {_REFETCH}")


def read_header(path: Path) -> GGUFHeader:
    """Parse and check a GGUF file's header; a truncated or corrupt file gets a one-line error."""
    reader = open_reader(path)
    try:
        metadata = {k: _scalar(f) for k, f in reader.fields.items() if not _is_big_array(k)}
    except _PARSE_ERRORS as exc:
        raise _corrupt(path) from exc
    types: Counter[str] = Counter()
    num_params = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        num_params += int(t.n_elements)
    tensor_names = {t.name for t in reader.tensors}
    spec = spec_from_metadata(metadata, tensor_names, path)
    return GGUFHeader(spec=spec, metadata=metadata, tensor_types=types, num_parameters=num_params)


def spec_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelSpec:
    arch = str(meta.get("general.architecture", "unknown"))
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; kiln runs "
            f"{', '.join(GGUF_ARCHITECTURES)} GGUFs ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFormatError(f"{path.name}: GGUF header lacks {arch}.{name}; the file is incomplete")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len_tokens(meta)),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return ModelSpec.from_hf_config(cfg)


def len_tokens(meta: dict[str, Any]) -> int:
    return int(meta.get("tokenizer.ggml.token_count", 0))


def _is_big_array(key: str) -> bool:
    return key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.scores")


def _scalar(f: Any) -> Any:
    value = f.contents()
    if isinstance(value, list) and len(value) > 64:
        return f"<{len(value)} values>"
    return value


def cached_folder(sha256: str) -> Path:
    return settings.cache_dir() / "gguf" / sha256


def ensure_converted(path: Path, sha256: str) -> Path:
    """Return the cached Hugging Face folder for this GGUF, dequantizing it first if needed."""
    folder = cached_folder(sha256)
    if (folder / SOURCE_FILE).is_file():
        return folder
    header = read_header(path)  # refuse corrupt files and unknown architectures before the slow part
    print(
        f"kiln: dequantizing {path.name} once (about 15 s); cached in {folder}",
        file=sys.stderr,
    )
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(path, header, tmp)
        # The marker file is written last, so an interrupted conversion is never taken as done.
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {"gguf": str(path), "sha256": sha256, "kiln_version": __version__,
                 "add_bos_token": bool(header.metadata.get("tokenizer.ggml.add_bos_token", False))},
                indent=2,
            )
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:  # a cache that is a file, read-only or full: the reading side raised ModelFormatError
        raise InvalidParameterError(
            f"cannot write the dequantized copy of {path.name} under {settings.cache_dir()} ({exc.strerror}); "
            "set KILN_CACHE to a writable folder with room for it"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(path: Path, header: GGUFHeader, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelFormatError(f"{path.name} could not be dequantized ({exc}); the file may be damaged") from exc
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if header.spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config.pop(k, None)
    config["architectures"] = [header.spec.architecture]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
