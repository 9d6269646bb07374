"""The evaluation runner: metrics per task kind, Ctrl-C leaves a checkpoint, --resume finishes the run."""

from __future__ import annotations

import json
from dataclasses import replace
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
    # a limit the task does not count was ignored, and one below a chunk scored a whole chunk
    with pytest.raises(InvalidParameterError, match="--limit counts items, and wikitext2 is one text"):
        EvalOptions(task="wikitext2", limit=10)
    with pytest.raises(InvalidParameterError, match="--limit-tokens applies to perplexity"):
        EvalOptions(task="hellaswag", limit_tokens=1024)
    with pytest.raises(InvalidParameterError, match="--limit-tokens 10 is less than one chunk of --ctx 512"):
        EvalOptions(task="wikitext2", limit_tokens=10)


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

    def flaky(scorer, tokenizer, items, on_done=None, max_tokens=None):  # noqa: ANN001, ANN202
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scorer, tokenizer, items, max_tokens=max_tokens)

    monkeypatch.setattr(multiple_choice, "evaluate_items", flaky)
    monkeypatch.setattr(runner, "_process", _small_batches(runner._process))
    with pytest.raises(EvalInterrupted, match=r"interrupted after 10 of 25 items.*--resume"):
        run(default_model, options, progress=False)
    calls.clear()
    monkeypatch.setattr(multiple_choice, "evaluate_items", real)
    resumed = run(default_model, EvalOptions(task=f"mc:{items_file}", resume=True), progress=False)
    assert resumed.metrics == full.metrics
    assert [r["index"] for r in resumed.records] == list(range(25))


def test_resume_without_an_interrupted_run_is_refused(default_model: LoadedModel, items_file: Path, home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # --resume with nothing to resume started afresh without a word, as kiln distill --resume did
    with pytest.raises(InvalidParameterError, match=r"--resume: there is no interrupted run of .*drop --resume"):
        run(default_model, EvalOptions(task=f"mc:{items_file}", resume=True), progress=False)
    # a run interrupted before its first batch can still be resumed: the checkpoint exists from the start
    options = EvalOptions(task=f"mc:{items_file}", limit=3)
    real = multiple_choice.evaluate_items
    monkeypatch.setattr(multiple_choice, "evaluate_items", _ctrl_c)
    with pytest.raises(EvalInterrupted, match=r"interrupted after 0 of 3 items.*--resume"):
        run(default_model, options, progress=False)
    monkeypatch.setattr(multiple_choice, "evaluate_items", real)
    resumed = run(default_model, replace(options, resume=True), progress=False)
    assert [r["index"] for r in resumed.records] == [0, 1, 2]


def _ctrl_c(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


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


def test_a_built_in_task_without_items_names_the_folder_it_read(default_model: LoadedModel, tmp_path: Path,
                                                                 home: Path) -> None:
    # it said to check KILN_DATA_DIR where --data had named another folder
    (tmp_path / "extras").mkdir()
    (tmp_path / "extras" / "lambada_openai_llmfoundry.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=f"lambada_openai has no items to evaluate; check its data files under "
                                              f"{tmp_path}$"):
        run(default_model, EvalOptions(task="lambada_openai", data_dir=tmp_path), progress=False)


def test_a_result_is_stored_once_whenever_ctrl_c_comes_at_the_end(default_model: LoadedModel, items_file: Path,
                                                                   home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checkpoint was removed before the result was stored: a Ctrl-C in between lost the finished run.
    # Now it is stored first, and --resume after a Ctrl-C on either side of the write stores it once.
    from kiln import cli, runs
    from kiln.evaluate import checkpoint
    from kiln.model import load

    monkeypatch.setattr(load, "load", lambda *args, **kwargs: default_model)
    monkeypatch.setattr(cli, "_end_on_next_ctrl_c", lambda: None)  # leaves pytest's SIGINT handler alone
    argv = ["eval", "--task", f"mc:{items_file}", "--limit", "5", "--json"]
    partial = home / "home" / "partial"
    real_add, real_discard = runs.add, checkpoint.Checkpoint.discard
    stored: list[int] = []

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    def add(run: runs.Run, path: Path | None = None) -> int:
        stored.append(real_add(run, path))
        return stored[-1]

    def discard_after_add(self: checkpoint.Checkpoint) -> None:
        if stored:
            raise KeyboardInterrupt
        real_discard(self)

    monkeypatch.setattr(runs, "add", ctrl_c)  # Ctrl-C while the result is written
    assert cli.main(argv) == 130
    assert runs.query() == [] and len(list(partial.glob("*.jsonl"))) == 1  # the scored items wait for --resume
    monkeypatch.setattr(runs, "add", real_add)
    assert cli.main([*argv, "--resume"]) == 0
    assert len(runs.query()) == 1 and not list(partial.glob("*.jsonl"))

    monkeypatch.setattr(runs, "add", add)  # Ctrl-C after the result is written, before the checkpoint goes
    monkeypatch.setattr(checkpoint.Checkpoint, "discard", discard_after_add)
    assert cli.main(argv) == 130
    monkeypatch.setattr(checkpoint.Checkpoint, "discard", real_discard)
    assert cli.main([*argv, "--resume"]) == 0
    found = runs.query()
    assert len(found) == 2 and found[1].id == stored[0] == stored[1]  # the resumed run found its row
    assert found[0].run_key != found[1].run_key and not list(partial.glob("*.jsonl"))


def test_ctx_beyond_the_model_context_is_one_line(default_model: LoadedModel, home: Path) -> None:
    # an IndexError from the rotary table once ended the run with a traceback
    limit = default_model.spec.max_position
    with pytest.raises(InvalidParameterError, match=rf"--ctx {2 * limit} is more than the model's context of {limit}"):
        run(default_model, EvalOptions(task="wikitext2", ctx=2 * limit, limit_tokens=4 * limit), progress=False)


def test_samples_path_is_checked_before_the_evaluation(items_file: Path, home: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a folder given as --samples raised IsADirectoryError after the whole evaluation had run
    from kiln import cli
    from kiln.model import load as load_module

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before --samples was checked")

    monkeypatch.setattr(load_module, "load", no_load)
    assert cli.main(["eval", "--task", f"mc:{items_file}", "--samples", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"kiln: error: --samples {home} is a folder" in err


def test_resume_after_the_file_changed_is_refused(default_model: LoadedModel, items_file: Path, home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the checkpoint was named by the task string only: resumed after an edit of the file, the items scored
    # before it were kept beside the edited file's, and the run reported a mix of both files
    options = EvalOptions(task=f"mc:{items_file}")
    real = multiple_choice.evaluate_items
    monkeypatch.setattr(multiple_choice, "evaluate_items", _ctrl_c)
    with pytest.raises(EvalInterrupted):
        run(default_model, options, progress=False)
    monkeypatch.setattr(multiple_choice, "evaluate_items", real)
    items_file.write_text(items_file.read_text().replace('"gold": 0', '"gold": 1'))
    with pytest.raises(InvalidParameterError, match=r"no interrupted run of .* this content of its file"):
        run(default_model, replace(options, resume=True), progress=False)
    items_file.write_text(items_file.read_text().replace('"gold": 1', '"gold": 0'))  # as it was: it resumes
    assert len(run(default_model, replace(options, resume=True), progress=False).records) == 25


def test_samples_path_that_is_the_task_file_is_refused(items_file: Path, home: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the samples were written over the user's mc: file once the evaluation ended
    from kiln import cli
    from kiln.model import load as load_module

    def no_load(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before --samples was checked")

    monkeypatch.setattr(load_module, "load", no_load)
    items = items_file.read_text()
    monkeypatch.chdir(items_file.parent)  # the same file by another name
    assert cli.main(["eval", "--task", "mc:items.jsonl", "--samples", str(items_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the task's data file" in err and items_file.read_text() == items


def test_an_item_beyond_the_models_context_is_refused_naming_its_line(default_model: LoadedModel,
                                                                      tmp_path: Path, home: Path) -> None:
    # it ended in an IndexError from the rotary table, after the items before it were scored
    path = tmp_path / "items.jsonl"
    context = "word " * (default_model.spec.max_position + 10)
    path.write_text(json.dumps({"context": context, "choices": [" a", " b"], "gold": 0}) + "\n")
    with pytest.raises(DataFormatError, match=r"items.jsonl:1: the context and choice ' a' are \d+ tokens, more "
                                              r"than the model's context of 8192; shorten the context"):
        runner.run(default_model, runner.EvalOptions(f"mc:{path}"), progress=False)


def test_an_item_beyond_the_models_context_is_refused_before_any_item_is_scored(
        default_model: LoadedModel, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the longest items' checkpoint batch comes last: every other item was scored before the refusal
    from kiln.evaluate import multiple_choice

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("items were scored before the long one was refused")

    monkeypatch.setattr(multiple_choice, "evaluate_items", no_scoring)
    path = tmp_path / "items.jsonl"
    short = [json.dumps({"context": f"Item {i} is", "choices": [" a", " b"], "gold": 0}) for i in range(70)]
    long = json.dumps({"context": "word " * (default_model.spec.max_position + 10), "choices": [" a", " b"], "gold": 0})
    path.write_text("\n".join([*short, long]) + "\n")
    with pytest.raises(DataFormatError, match=r"items.jsonl:71: the context and choice ' a' are \d+ tokens"):
        runner.run(default_model, runner.EvalOptions(f"mc:{path}"), progress=False)


def test_a_generation_prompt_beyond_the_context_is_refused_naming_its_line(default_model: LoadedModel,
                                                                           tmp_path: Path, home: Path) -> None:
    # the engine refused it when its batch came, after the items before it, without naming the item
    from kiln.errors import ContextLengthError

    path = tmp_path / "gen.jsonl"
    long = "word " * (default_model.spec.max_position + 10)
    path.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n\n"
                    + json.dumps({"prompt": long, "reference": "a"}) + "\n")
    with pytest.raises(ContextLengthError, match=r"gen.jsonl:3: the prompt is \d+ tokens, and the model's context "
                                                 r"of 8192 leaves no room for an answer; shorten it"):
        run(default_model, EvalOptions(f"gen:{path}", max_new_tokens=2), progress=False)


def test_a_baseline_for_a_task_it_does_not_apply_to_is_refused_before_loading(
        home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # it was refused once the model and the baseline had both loaded
    from kiln import cli
    from kiln.model import load

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before --baseline was checked")

    monkeypatch.setattr(load, "load", no_load)
    assert cli.main(["eval", "--task", "piqa", "--baseline", "other", "--limit", "2"]) == 2
    assert "kiln: error: --baseline applies to perplexity tasks, not 'piqa'" in capsys.readouterr().err
