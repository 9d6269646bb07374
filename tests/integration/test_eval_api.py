"""kiln eval --api against the real kiln serve on the default model: the same items scored in-process and
through the server give the same accuracy, per-item log-likelihoods and perplexity."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import settings
from kiln.evaluate.client import ApiConfig
from kiln.evaluate.runner import EvalOptions, run
from kiln.evaluate.served import connect
from kiln.model.load import LoadedModel

from .conftest import KILN, Server, kiln_server

# The server runs the default model on onnxruntime (--runtime auto picks it for fp32) and scores each prompt in
# one full forward pass; in-process, kiln's torch graph computes each context once and batches the continuations.
# Both are fp32, and summing in another order over ~100 tokens and 30 layers moved a HellaSwag choice's
# log-likelihood by at most 1.4e-4 on these 8 items (4.1e-4 over the first 100 items' 400 choices): 1e-3 leaves
# room for other CPUs' kernels, while a real fault (another tokenization, a dropped token, a position off by
# one) moves it by 0.1 or more.
LOGLIKELIHOOD_ATOL = 1e-3
PPL_RTOL = 1e-3  # 0.1%: the same per-token differences, averaged over the scored tokens


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    with kiln_server(env={"KILN_HOME": str(module_tmp / "server-home")}, tmp=module_tmp) as s:
        yield s


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_multiple_choice_through_the_server_matches_in_process(server: Server, default_model: LoadedModel,
                                                                home: Path, tmp_path: Path) -> None:
    if not (settings.data_dir() / "hellaswag").is_dir():
        pytest.skip(f"HellaSwag not found under {settings.data_dir()}; set KILN_DATA_DIR")
    options = EvalOptions(task="hellaswag", limit=8)
    local = run(default_model, options, progress=False)
    samples = tmp_path / "served.jsonl"
    env = {**os.environ, "KILN_HOME": str(home)}
    proc = subprocess.run([KILN, "eval", "--api", server.url, "--task", "hellaswag", "--limit", "8", "--json",
                           "--samples", str(samples)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout)
    assert served["acc"] == local.metrics["acc"] and served["acc_norm"] == local.metrics["acc_norm"]
    assert served["model_sha256"] == default_model.sha256 and served["num_items"] == 8
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["index"] for r in records] == [r["index"] for r in local.records]
    for mine, theirs in zip(local.records, records, strict=True):
        assert theirs["loglikelihoods"] == pytest.approx(mine["loglikelihoods"], abs=LOGLIKELIHOOD_ATOL)
    listed = json.loads(subprocess.run([KILN, "runs", "--json"], capture_output=True, text=True, env=env,
                                       check=True).stdout)
    assert listed[-1]["settings"]["api"] == server.url and listed[-1]["settings"]["api_model"] == "default"
    assert "precision" not in listed[-1]["settings"]  # the server's, which kiln does not know


def test_perplexity_through_the_server_matches_in_process(server: Server, default_model: LoadedModel,
                                                          home: Path) -> None:
    options = EvalOptions(task="wikitext2", limit_tokens=1024)
    local = run(default_model, options, progress=False)
    served_model = connect("default", ApiConfig(server.url + "/v1"))
    try:
        served = run(served_model, options, progress=False)
    finally:
        served_model.close()
    assert served.metrics["tokens_scored"] == local.metrics["tokens_scored"] == 2 * 255
    assert served.metrics["ppl"] == pytest.approx(local.metrics["ppl"], rel=PPL_RTOL)
    assert served.settings["api"] == server.url


def test_generation_through_the_server_matches_in_process(server: Server, default_model: LoadedModel, home: Path,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "What is the capital of France? Answer in one word.", "reference": "Paris"}\n'
                    '{"prompt": "Name a colour of the sky.", "reference": "blue"}\n')
    options = EvalOptions(task=f"gen:{path}", max_new_tokens=8)
    local = run(default_model, options, progress=False)
    served_model = connect("default", ApiConfig(server.url))
    try:
        served = run(served_model, options, progress=False)  # the chat template applied by the server
    finally:
        served_model.close()
    assert [r["output"] for r in served.records] == [r["output"] for r in local.records]
    assert "Paris" in served.records[0]["output"] and served.metrics == local.metrics
