"""The evaluation runner: metrics per task kind, Ctrl-C leaves a checkpoint, --resume finishes the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import DataFormatError, InvalidParameterError
from kiln.evaluate import multiple_choice, runner
from kiln.evaluate.runner import EvalInterrupted, EvalOptions, run
from kiln.model.load import LoadedModel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    lines = [f'{{"context": "{a} plus {b} equals", "choices": [" {a + b}", " {a + b + 3}"], "gold": 0}}'
             for a in range(1, 6) for b in range(1, 6)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_options_are_checked_before_loading() -> None:
    with pytest.raises(InvalidParameterError, match="unknown task"):
        EvalOptions(task="nope")
    with pytest.raises(InvalidParameterError, match="--limit 0"):
        EvalOptions(task="piqa", limit=0)
    with pytest.raises(InvalidParameterError, match="--ctx 15"):
        EvalOptions(task="wikitext2", ctx=15)


def test_multiple_choice_run(default_model: LoadedModel, items_file: Path, home: Path) -> None:
    outcome = run(default_model, EvalOptions(task=f"mc:{items_file}"), progress=False)
    assert outcome.kind == "multiple_choice" and len(outcome.records) == 25
    assert set(outcome.metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert [r["index"] for r in outcome.records] == list(range(25))
    assert len(outcome.worst(3)) == 3 and outcome.worst(1)[0]["score"] == min(r["score"] for r in outcome.records)


def test_interrupt_then_resume(default_model: LoadedModel, items_file: Path, home: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    options = EvalOptions(task=f"mc:{items_file}")
    full = run(default_model, options, progress=False)
    real = multiple_choice.evaluate_items
    calls: list[int] = []

    def flaky(model, tokenizer, items, max_rows=32, on_done=None):  # noqa: ANN001, ANN202
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, items, max_rows=max_rows)

    monkeypatch.setattr(multiple_choice, "evaluate_items", flaky)
    monkeypatch.setattr(runner, "_process", _small_batches(runner._process))
    with pytest.raises(EvalInterrupted, match=r"interrupted after 10 of 25 items.*--resume"):
        run(default_model, options, progress=False)
    calls.clear()
    monkeypatch.setattr(multiple_choice, "evaluate_items", real)
    resumed = run(default_model, EvalOptions(task=f"mc:{items_file}", resume=True), progress=False)
    assert resumed.metrics == full.metrics
    assert [r["index"] for r in resumed.records] == list(range(25))


def _small_batches(process):  # noqa: ANN001, ANN202 (wraps runner._process to checkpoint every 10 items)
    def wrapped(items, done, index, batch_size, *rest, **kw):  # noqa: ANN001, ANN202
        return process(items, done, index, 10, *rest, **kw)

    return wrapped


def test_generation_run(default_model: LoadedModel, tmp_path: Path, home: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "What is the capital of France? Answer in one word.", "reference": "Paris"}\n'
                    '{"prompt": "Say the word: banana", "reference": "banana"}\n')
    outcome = run(default_model, EvalOptions(task=f"gen:{path}", max_new_tokens=12), progress=False)
    assert set(outcome.metrics) == {"exact_match", "f1", "bleu", "rouge_l"}
    assert "Paris" in outcome.records[0]["output"] and outcome.records[0]["f1"] > 0


def test_perplexity_run_with_baseline(default_model: LoadedModel, home: Path) -> None:
    outcome = run(default_model, EvalOptions(task="wikitext2", limit_tokens=1024), baseline=default_model,
                  progress=False)
    m = outcome.metrics
    assert m["chunks"] == 2 and m["tokens_scored"] == 2 * 255
    assert 5 < m["ppl"] < 100 and m["kld"] == pytest.approx(0, abs=1e-6) and m["same_top1"] == 1.0


@pytest.mark.parametrize("kind", ["mc", "gen"])
def test_a_file_without_items_is_refused(kind: str, default_model: LoadedModel, tmp_path: Path, home: Path) -> None:
    # an empty file once gave NaN metrics (printed as invalid JSON, stored as a run) or a ZeroDivisionError
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataFormatError, match=f"{path} has no items to evaluate"):
        run(default_model, EvalOptions(task=f"{kind}:{path}"), progress=False)
