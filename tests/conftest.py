"""Shared fixtures: the default model (loaded once), the transformers oracle, tiny random models."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln import settings
from kiln.model.load import LoadedModel, load

warnings.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Give torch its thread count back after each test: a runtime may narrow it (onnxruntime holds torch
    to one thread), and later tests would run, and round, differently."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class RecordedBar:
    """Stands in for tqdm: how far a bar got, and whether it shows (disable=None: on a terminal)."""

    def __init__(self, total: int | None = None, disable: bool | None = None, **_: object) -> None:
        self.total, self.done, self.disable = total, 0, disable

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix_str(self, _text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> RecordedBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass


@pytest.fixture
def recorded_bars(monkeypatch: pytest.MonkeyPatch) -> Callable[[object], list[RecordedBar]]:
    """record(module): replace the module's tqdm; returns the list its bars are appended to."""

    def record(module: object) -> list[RecordedBar]:
        bars: list[RecordedBar] = []

        def make(*args: Any, **kwargs: Any) -> RecordedBar:
            bars.append(RecordedBar(*args, **kwargs))
            return bars[-1]

        monkeypatch.setattr(module, "tqdm", make)
        return bars

    return record


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    return load("default", progress=False)


@pytest.fixture(scope="session")
def hf_reference(default_model: LoadedModel):
    """transformers' LlamaForCausalLM on the same (cached, dequantized) weights: the oracle."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def mt_bench_prompts() -> list[str]:
    path = settings.data_dir() / "prompts" / "mt_bench_question.jsonl"
    if not path.is_file():
        pytest.skip(f"MT-bench prompts not found at {path}; set KILN_DATA_DIR to the shared data folder")
    with path.open() as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()]


@pytest.fixture(scope="session")
def tiny_folder(default_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama with the real tokenizer and a 64-token context, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=default_model.spec.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        eos_token_id=2, bos_token_id=1,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model.folder / name).exists():
            shutil.copy(default_model.folder / name, folder / name)
    return folder


@contextmanager
def _ready_client(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(300):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        yield client


@pytest.fixture(scope="session")
def ready_client() -> Callable[[Any], AbstractContextManager[Any]]:
    """`with ready_client(app) as client:` a TestClient on a kiln app once /ready says its models are loaded
    (at most 30 s)."""
    return _ready_client
