"""kiln eval, bench, plan and runs as a user runs them: JSON keys, the runs database, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.benchmark.machine import cpu_name
from kiln.plan.profile import PROFILE_VERSION

KILN = str(Path(sys.executable).parent / "kiln")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KILN_HOME": str(tmp_path / "home")}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KILN, *args], capture_output=True, text=True, timeout=600, env=env)


def one_line_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and text in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_multiple_choice_json_samples_and_runs(env: dict[str, str], tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"context": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0}\n'
                     '{"context": "Two plus two is", "choices": [" four", " nine"], "gold": 0}\n')
    samples = tmp_path / "samples.jsonl"
    proc = run(env, "eval", "--task", f"mc:{items}", "--json", "--samples", str(samples))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "model_sha256", "num_items"} <= set(out)
    assert out["num_items"] == 2
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert {"input", "target", "loglikelihoods", "correct"} <= set(records[0])
    listed = json.loads(run(env, "runs", "--json").stdout)
    assert len(listed) == 1 and listed[0]["task"] == f"mc:{items}" and listed[0]["metrics"]["acc"] == out["acc"]


def test_perplexity_json(env: dict[str, str]) -> None:
    proc = run(env, "eval", "--task", "wikitext2", "--limit-tokens", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["chunks"] == 2 and out["ppl"] > 1 and out["ppl_stderr"] > 0


def test_unknown_task(env: dict[str, str]) -> None:
    one_line_error(run(env, "eval", "--task", "mmlu"), "known tasks: wikitext2, hellaswag")


def test_missing_data(env: dict[str, str], tmp_path: Path) -> None:
    one_line_error(run(env, "eval", "--task", "piqa", "--data", str(tmp_path)), "KILN_DATA_DIR")


def test_malformed_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n{oops\n')
    one_line_error(run(env, "eval", "--task", f"mc:{bad}"), f"{bad}:2: not valid JSON")


def test_bench_json(env: dict[str, str]) -> None:
    proc = run(env, "bench", "--runs", "1", "--batch-sizes", "1,2", "--prompt-tokens", "32", "--new-tokens", "4",
               "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["batch_size"] for r in out["results"]] == [1, 2]
    keys = {"batch_size", "prefill_tokens_per_s", "decode_tokens_per_s", "total_decode_tokens_per_s", "ttft_ms",
            "itl_ms_p50", "itl_ms_p99", "peak_rss_bytes"}
    assert keys <= set(out["results"][0]) and out["bytes_in_memory"] > 0
    for row in out["results"]:  # the peak while generating leaves loading out; the process's peak keeps it
        assert 0 < row["serving_peak_rss_bytes"] <= row["peak_rss_bytes"]
    assert json.loads(run(env, "runs", "--json", "--kind", "bench").stdout)[0]["task"] == "bench"


def test_bad_batch_sizes(env: dict[str, str]) -> None:
    one_line_error(run(env, "bench", "--batch-sizes", "1,x"), "--batch-sizes '1,x'")


def test_plan_json_from_a_cached_profile(env: dict[str, str], tmp_path: Path) -> None:
    import torch

    cache = tmp_path / "cache"
    cache.mkdir()
    engine_keys = ("torch:fp32", "torch:bf16", "torch:int8", "torch:int4")  # calibrated without ONNX Runtime
    profile = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "read_bandwidth_gbs": 25.0,
               "seconds_per_weight_byte": {k: {"1": 4e-11, "4": 6e-11, "16": 8e-11} for k in engine_keys},
               "prefill_gflops": {k: 300.0 for k in engine_keys}, "prefill_efficiency": {k: 0.8 for k in engine_keys},
               "layer_overhead_s": {k: {"1": 1e-4, "4": 1.2e-4, "16": 2e-4} for k in engine_keys},
               "step_overhead_s": {k: {"1": 1e-3, "4": 2e-3, "16": 5e-3} for k in engine_keys},
               "kv_seconds_per_byte": {k: {"1": 5e-11, "4": 3e-11, "16": 3e-11} for k in engine_keys},
               "runtime_bytes": 250_000_000, "version": PROFILE_VERSION}
    (cache / "machine-profile.json").write_text(json.dumps(profile))
    proc = run({**env, "KILN_CACHE": str(cache)}, "plan", "--precision", "int8", "--context", "2048",
               "--concurrency", "4", "--target-tokens-per-s", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    keys = {"weights_bytes", "kv_cache_bytes", "activations_bytes", "total_bytes", "prefill_tokens_per_s",
            "decode_tokens_per_s"}
    assert keys <= set(out) and out["kv_cache_bytes"] == 46080 * 2048 * 4 and out["recommendation"]
    assert out["runtime"] == "torch"  # the profile has no onnxruntime costs
    text = run({**env, "KILN_CACHE": str(cache)}, "plan", "--context", "1024")
    assert text.returncode == 0 and "decode step at batch 1" in text.stdout and "KV cache" in text.stdout
    refused = run({**env, "KILN_CACHE": str(cache)}, "plan", "--runtime", "onnxruntime")
    assert refused.returncode != 0 and "kiln plan --calibrate" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
