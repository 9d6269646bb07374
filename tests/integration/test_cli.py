"""The kiln command as a user runs it: output, JSON, exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import __version__
from kiln.model.source import default_gguf_path

KILN = [str(Path(sys.executable).parent / "kiln")]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KILN, *args], input=stdin, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"kiln {__version__}"


def test_info_json_describes_the_default_model() -> None:
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["heads"], info["kv_heads"], info["vocab_size"]) == (30, 9, 3, 49152)
    assert info["context_length"] == 8192 and info["parameters"] == 134_515_008
    assert info["size_bytes"] == default_gguf_path().stat().st_size and len(info["sha256"]) == 64
    assert info["dtypes"]["Q4_1"] > 0


def test_info_text() -> None:
    proc = run("info")
    assert proc.returncode == 0 and "LlamaForCausalLM" in proc.stdout and "sha256" in proc.stdout


def test_generate_answers_paris() -> None:
    proc = run("generate", "What is the capital of France?", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_generate_json() -> None:
    proc = run("generate", "What is the capital of France?", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_ms",
                        "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert "Paris" in out["text"] and out["finish_reason"] == "stop" and out["completion_tokens"] > 0
    assert out["ttft_ms"] > 0 and out["decode_tokens_per_s"] > 0


def test_generate_raw_with_stop_and_seed() -> None:
    args = ["generate", "The three primary colours are", "--raw", "--max-tokens", "30", "--seed", "3",
            "--temperature", "0.7", "--stop", ".", "--json"]
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["text"] == b["text"] and "." not in a["text"]


def test_chat_answers_each_line_and_resets() -> None:
    proc = run("chat", "--temperature", "0", "--max-tokens", "24",
               stdin="What is the capital of France?\nAnd of Italy?\n/reset\nHi\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    before_reset, after_reset = proc.stdout.split("[conversation reset]")
    answers = [line for line in before_reset.splitlines() if line.strip()]
    assert len(answers) == 2 and "Paris" in answers[0]
    assert after_reset.strip() and "never read" not in proc.stdout


def test_missing_model_path(tmp_path: Path) -> None:
    assert_one_line_error(run("generate", "-m", str(tmp_path / "x.gguf"), "hi"), "does not exist")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert_one_line_error(run("info", "-m", str(tmp_path)), "no *.safetensors weights")


def test_truncated_gguf(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with default_gguf_path().open("rb") as f:
        path.write_bytes(f.read(3_000_000))
    assert_one_line_error(run("generate", "-m", str(path), "hi"), "truncated or corrupt")


def test_unsupported_architecture(tmp_path: Path, tiny_folder: Path) -> None:
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    assert_one_line_error(run("info", "-m", str(folder)), "LlamaForCausalLM, MistralForCausalLM")


def test_prompt_longer_than_context(tiny_folder: Path) -> None:
    proc = run("generate", "-m", str(tiny_folder), "-", "--raw", stdin="word " * 200)
    assert_one_line_error(proc, "context is 64")


def test_bad_sampling_parameter() -> None:
    assert_one_line_error(run("generate", "hi", "--top-p", "0"), "--top-p 0.0 is out of range")


def test_generate_follows_a_json_schema(tmp_path: Path) -> None:
    schema = tmp_path / "capital.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"capital": {"type": "string"}},
                                  "required": ["capital"], "additionalProperties": False}))
    proc = run("generate", "What is the capital of France? Answer in JSON.", "--temperature", "0",
               "--json-schema", str(schema), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert json.loads(out["text"]) == {"capital": "Paris"} and out["finish_reason"] == "stop"


@pytest.mark.parametrize(("schema", "message"), [
    ('{"type":', "not valid JSON"),
    ("nowhere.json", "neither inline JSON nor a readable file"),
    ('{"type": "string", "pattern": "[a-"}', "unclosed character class"),
])
def test_bad_json_schema(schema: str, message: str) -> None:
    assert_one_line_error(run("generate", "hi", "--json-schema", schema), message)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run("generate", "--debug", "-m", str(tmp_path / "x.gguf"), "hi")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.parametrize("verb", ["info", "generate", "chat"])
def test_help(verb: str) -> None:
    proc = run(verb, "--help")
    assert proc.returncode == 0 and "--model" in proc.stdout
