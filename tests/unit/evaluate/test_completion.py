"""LAMBADA (lambada_openai): the harness's pairs and definitions, scored through the shared-context scorer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln import settings
from kiln.errors import DataFormatError, DataNotFoundError
from kiln.evaluate import completion, runner, summary
from kiln.evaluate.multiple_choice import encode_choice
from kiln.evaluate.tasks import completion as completion_tasks
from kiln.evaluate.tasks import resolve
from kiln.model.load import LoadedModel

DATA = settings.data_dir()
needs_data = pytest.mark.skipif(not (DATA / completion_tasks.LAMBADA_FILE).is_file(),
                                reason=f"{completion_tasks.LAMBADA_FILE} not found under {DATA}; set KILN_DATA_DIR")
PASSAGES = [("The capital of France is", "Paris"), ("One, two, three, four, five, six, seven, eight, nine,", "ten"),
            ("She opened the door and said hello to her", "mother"), ("Monday, Tuesday, Wednesday,", "Thursday")]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding a small LAMBADA file in the shared data's layout."""
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    path = tmp_path / "data" / completion_tasks.LAMBADA_FILE
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in PASSAGES))
    return tmp_path / "data"


def test_lambada_is_a_completion_task() -> None:
    assert resolve("lambada_openai").kind == "completion"


@needs_data
def test_the_shared_file_gives_the_harness_pairs() -> None:
    items = list(completion_tasks.load("lambada_openai"))
    assert len(items) == 5153 and [it.index for it in items[:3]] == [0, 1, 2]
    # the harness: doc_to_text = the passage but its last word, doc_to_target = " " + that word
    assert all(it.continuation.startswith(" ") and " " not in it.continuation[1:] for it in items)
    assert items[0].context.endswith("I don't care about") and items[0].continuation == " signs"


def test_metrics_follow_the_harness() -> None:
    records = [{"loglikelihood": ll, "correct": ok} for ll, ok in [(-1.0, True), (-3.0, False), (-2.0, True),
                                                                   (-6.0, False)]]
    m = completion.metrics(records)
    assert m["acc"] == 0.5 and m["acc_stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))
    assert m["ppl"] == pytest.approx(math.exp(3.0))  # exp of the mean per-item negative log-likelihood
    nll_se = math.sqrt(sum((x - 3.0) ** 2 for x in (1, 3, 2, 6)) / 3 / 4)
    assert m["ppl_stderr"] == pytest.approx(math.exp(3.0) * nll_se)
    assert completion.metrics(records[:1])["ppl_stderr"] is None  # one item: no error, not NaN


@torch.inference_mode()
def test_a_run_scores_each_word_as_the_whole_passage_does(default_model: LoadedModel, data_dir: Path) -> None:
    outcome = runner.run(default_model, runner.EvalOptions("lambada_openai", data_dir=data_dir), progress=False)
    assert outcome.kind == "completion" and [r["index"] for r in outcome.records] == [0, 1, 2, 3]
    tok = default_model.tokenizer
    for (context, word), r in zip(PASSAGES, outcome.records, strict=True):
        ctx, cont = encode_choice(tok, context, " " + word)
        logprobs = torch.log_softmax(default_model.model(torch.tensor([ctx + cont]), logits="all")[0].float(), -1)
        pairs = list(zip(range(len(ctx) - 1, len(ctx) + len(cont) - 1), cont, strict=True))  # position, token
        assert r["loglikelihood"] == pytest.approx(sum(float(logprobs[p, t]) for p, t in pairs), abs=1e-3)
        assert r["greedy"] == all(int(logprobs[p].argmax()) == t for p, t in pairs)
        assert r["target"] == " " + word and r["tokens"] == len(cont)
    assert outcome.records[1]["greedy"]  # "ten" after counting to nine
    lls = [r["loglikelihood"] for r in outcome.records]
    assert outcome.metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 4))
    assert outcome.metrics["acc"] == sum(r["greedy"] for r in outcome.records) / 4
    assert summary.text(outcome).startswith(f"lambada_openai: ppl {outcome.metrics['ppl']:.4f} ± ")
    limited = runner.run(default_model, runner.EvalOptions("lambada_openai", limit=2, data_dir=data_dir),
                         progress=False)
    assert [r["loglikelihood"] for r in limited.records] == pytest.approx(lls[:2], abs=1e-4)


def test_missing_data_and_bad_lines_are_one_line(default_model: LoadedModel, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"data file extras/lambada_openai_llmfoundry.jsonl not found under "
                                                r".*; pass --data DIR or set KILN_DATA_DIR"):
        runner.run(default_model, runner.EvalOptions("lambada_openai", data_dir=tmp_path / "none"), progress=False)
    path = data_dir / completion_tasks.LAMBADA_FILE
    path.write_text(path.read_text() + '{"context": "no word follows"}\n')
    with pytest.raises(DataFormatError, match=r"lambada_openai_llmfoundry.jsonl:5: missing field 'continuation'"):
        list(completion_tasks.load("lambada_openai", data_dir))
    path.write_text('{"context": "text", "continuation": "  "}\n')
    with pytest.raises(DataFormatError, match=r":1: 'context' and 'continuation' must both hold text"):
        list(completion_tasks.load("lambada_openai", data_dir))


def test_the_cli_prints_the_json_keys(data_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln", "eval", "--task", "lambada_openai", "--limit", "2",
                           "--data", str(data_dir), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "lambada_openai" and out["num_items"] == 2
    assert {"ppl", "ppl_stderr", "acc", "acc_stderr"} <= set(out)
