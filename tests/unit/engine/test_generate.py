"""Generation on the default model: finish reasons, stop strings, streaming, limits, batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine.generate import Generator
from kiln.engine.sampler import SamplingParams
from kiln.errors import ContextLengthError, InvalidParameterError
from kiln.model.load import LoadedModel, load

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def gen(default_model: LoadedModel) -> Generator:
    return Generator(default_model.model, default_model.tokenizer)


def chat(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_max_tokens_ends_with_length(gen: Generator, default_model: LoadedModel) -> None:
    prompt = chat(default_model, "Write a long story about a dragon.")
    out = gen.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5


def test_eos_ends_with_stop_and_is_not_in_the_text(gen: Generator, default_model: LoadedModel) -> None:
    out = gen.generate([chat(default_model, "What is the capital of France?")], GREEDY)[0]
    assert out.finish_reason == "stop" and out.completion_tokens < 40
    assert "<|im_end|>" not in out.text and "Paris" in out.text


def test_stop_string_spanning_tokens_truncates(gen: Generator, default_model: LoadedModel) -> None:
    prompt = chat(default_model, "What is the capital of France?")
    full = gen.generate([prompt], GREEDY)[0].text
    stop = "of Fr"  # spans several tokens of "The capital of France is Paris."
    assert stop in full
    out = gen.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_streamed_deltas_add_up_to_the_text(gen: Generator, default_model: LoadedModel) -> None:
    prompts = [chat(default_model, "Name three fruits."), chat(default_model, "Count to five.")]
    pieces: dict[int, list[str]] = {0: [], 1: []}
    outs = gen.generate(prompts, GREEDY, on_text=lambda row, delta: pieces[row].append(delta))
    for row, out in enumerate(outs):
        assert "".join(pieces[row]) == out.text and out.text


def test_same_seed_same_sample(gen: Generator, default_model: LoadedModel) -> None:
    prompt = chat(default_model, "Tell me a short poem.")
    params = SamplingParams(temperature=1.0, max_tokens=20, seed=1234)
    first = gen.generate([prompt], params)[0].token_ids
    assert gen.generate([prompt], params)[0].token_ids == first
    other = gen.generate([prompt], SamplingParams(temperature=1.0, max_tokens=20, seed=4321))[0].token_ids
    assert other != first


def test_per_row_parameters(gen: Generator, default_model: LoadedModel) -> None:
    prompt = chat(default_model, "What is the capital of France?")
    outs = gen.generate([prompt, prompt], [GREEDY, SamplingParams(temperature=0.0, max_tokens=3)])
    assert outs[0].finish_reason == "stop" and outs[1].finish_reason == "length"
    assert outs[1].token_ids == outs[0].token_ids[:3]


def test_prompt_longer_than_context_is_refused(gen: Generator) -> None:
    with pytest.raises(ContextLengthError, match=r"8200 tokens.*context is 8192"):
        gen.generate([[42] * 8200], GREEDY)


def test_empty_prompt_is_refused(gen: Generator) -> None:
    with pytest.raises(InvalidParameterError, match="empty"):
        gen.generate([[]], GREEDY)


def test_budget_is_clipped_to_the_context(tiny_folder: Path) -> None:
    # the tiny model's 64-token context: the same rule as the default model's 8192, without its long prefill
    tiny = load(str(tiny_folder), progress=False)
    assert tiny.spec.max_position == 64
    out = Generator(tiny.model, tiny.tokenizer).generate(
        [[42] * 62], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 2


def test_ctrl_c_between_a_request_finishing_and_its_blocks_going_back_leaves_nothing_behind(
        tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # abort() skipped a request already marked finished, so one caught there stayed running with its blocks
    # in the generator's engine (kiln chat keeps it for the next message)
    from kiln.engine.scheduler import Scheduler

    tiny = load(str(tiny_folder), progress=False)
    gen = Generator(tiny.model, tiny.tokenizer)
    remove = Scheduler.remove
    pressed = []

    def ctrl_c_once(self: Scheduler, request: object) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        remove(self, request)  # type: ignore[arg-type]

    monkeypatch.setattr(Scheduler, "remove", ctrl_c_once)
    with pytest.raises(KeyboardInterrupt):
        gen.generate([[42] * 20], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine = gen.engine
    assert engine is not None and pressed
    assert not engine.has_work and not engine.requests and engine.cache.used_blocks == 0


def test_a_refused_prompt_in_a_batch_leaves_none_of_the_others_queued(tiny_folder: Path) -> None:
    # the prompts added before the refused one stayed queued in the kept engine and ran with the next call
    tiny = load(str(tiny_folder), progress=False)
    gen = Generator(tiny.model, tiny.tokenizer)
    with pytest.raises(InvalidParameterError, match="the prompt is empty"):
        gen.generate([[42] * 10, []], SamplingParams(temperature=0.0, max_tokens=3))
    engine = gen.engine
    assert engine is not None and not engine.has_work and not engine.requests
