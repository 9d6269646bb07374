"""The `kiln` command's top level: how a run ends when the user presses Ctrl-C, and its sampling options."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kiln import cli
from kiln.engine.sampler import SamplerState
from kiln.serve.protocol import CompletionRequest

# A command interrupted by Ctrl-C, then a second Ctrl-C while the process winds down (atexit handlers:
# torch's compile-time dump, weakref finalizers), as when a user presses it twice.
TWICE = textwrap.dedent("""
    import atexit, os, signal, time
    from kiln import cli

    def second_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)

    def interrupted(args):
        raise KeyboardInterrupt

    atexit.register(second_ctrl_c)
    cli.cmd_runs = interrupted
    raise SystemExit(cli.main(["runs"]))
""")


def test_ctrl_c_twice_ends_with_one_line_and_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-c", TWICE], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip() == "kiln: interrupted"
    assert done.returncode in (130, -2)  # 130 by exit, or the SIGINT's own death (the shell shows 130)


FULL_DISK = textwrap.dedent("""
    import sys
    from kiln import cli

    def talk(args):
        print("x" * int(sys.argv[1]))  # a long output fails as it is written, a short one when it is flushed
        return 0

    cli.cmd_runs = talk
    raise SystemExit(cli.main(["runs"]))
""")


@pytest.mark.parametrize("size", [10, 1_000_000])
def test_output_to_a_full_disk_is_one_line(size: int) -> None:
    # `kiln generate ... > out.txt` on a full disk ended in an OSError traceback
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", FULL_DISK, str(size)], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("kiln: error: the disk is full: No space left on device; free some space and "
                                   "run the command again")


@pytest.mark.parametrize("verb", [["generate", "hi"], ["chat"]])
@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**100])
def test_a_seed_the_server_refuses_is_refused_in_one_line(verb: list[str], seed: int,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def no_load(*args: object, **kw: object) -> None:
        raise AssertionError("the seed is checked before the model loads")

    monkeypatch.setattr("kiln.model.load.load", no_load)
    assert cli.main([*verb, "--seed", str(seed)]) == 2
    error = capsys.readouterr().err
    assert error == f"kiln: error: --seed {seed} is out of range; it must be in [-2**63, 2**63 - 1], as the " \
                    "server's seed\n"
    with pytest.raises(ValidationError):  # the server's edge refuses the same seed
        CompletionRequest.model_validate({"prompt": "hi", "seed": seed})


@pytest.mark.parametrize(("flags", "error"), [
    (["--max-tokens", "0"], "--max-tokens 0 is out of range; it must be >= 1"),
    (["--top-p", "2"], "--top-p 2.0 is out of range; it must be in (0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0 is out of range"),
])
def test_a_sampling_flag_out_of_range_is_named_as_the_flag(flags: list[str], error: str) -> None:
    # it was named as the engine's field: "max_tokens=0 is out of range"
    with pytest.raises(cli.InvalidParameterError) as refused:
        cli._params(cli.build_parser().parse_args(["generate", "hi", *flags]))
    assert str(refused.value).startswith(error)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), -1, 2**32])
def test_a_seed_the_server_takes_is_taken_and_hashed_the_same_way(seed: int) -> None:
    params = cli._params(cli.build_parser().parse_args(["generate", "hi", "--seed", str(seed)]))
    served = CompletionRequest.model_validate({"prompt": "hi", "seed": seed}).sampling(16, None)
    assert params.seed == served.seed == seed
    draw = [torch.rand(4, generator=SamplerState(p, [1], 10).generator).tolist() for p in (params, served)]
    assert draw[0] == draw[1]


def test_a_resumable_interruption_starts_as_any_interruption(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # eval and distill said "kiln: error: interrupted ...", as if the user had made a mistake
    from kiln.errors import Interrupted

    def interrupted(_args: object) -> int:
        raise Interrupted("interrupted after 3 of 9 items; rerun the same command with --resume to continue")

    monkeypatch.setattr(cli, "cmd_runs", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert cli.main(["runs"]) == 130
    finally:
        signal.signal(signal.SIGINT, handler)  # main() leaves a second Ctrl-C to end the process
    assert capsys.readouterr().err == ("kiln: interrupted after 3 of 9 items; rerun the same command with --resume "
                                       "to continue\n")


def test_a_failed_sweep_entry_is_named_and_the_written_ones_kept(tiny_folder, tmp_path, capsys,  # noqa: ANN001
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the error of one entry read as if there were no sweep: it named neither the entry nor what survived
    from kiln.compress import pipeline

    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[artifact]]\nname = "int8"\n[[artifact.step]]\nkind = "quantize"\nbits = 8\n'
                     '[[artifact]]\nname = "thin"\n[[artifact.step]]\nkind = "lowrank"\nrank = 60000\n')
    out = tmp_path / "out"
    argv = ["compress", "-m", str(tiny_folder), "--sweep", str(sweep), "-o", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: sweep entry 'thin': lowrank: no layer gets smaller") and "\n" not in err
    assert err.endswith(f"int8 already written in {out} and kept")
    assert (out / "int8" / "manifest.json").is_file() and not (out / "thin").exists()

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_end_on_next_ctrl_c", lambda: None)  # leaves pytest's SIGINT handler alone
    monkeypatch.setattr(pipeline, "compress", ctrl_c)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == "kiln: interrupted in sweep entry 'int8'; no artifact written before it"


def test_a_sweep_entry_calibrating_on_the_test_split_is_refused_before_the_first_artifact(
        tiny_folder, tmp_path, capsys) -> None:  # noqa: ANN001
    # the first entry was compressed and written before the second's calibration file was looked at
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[artifact]]\nname = "int8"\n[[artifact.step]]\nkind = "quantize"\nbits = 8\n'
                     '[[artifact]]\nname = "gptq"\n[artifact.calibration]\nfile = "wikitext-2-raw/wiki.test.raw"\n'
                     '[[artifact.step]]\nkind = "quantize"\nmethod = "gptq"\n')
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("text " * 100)
    out = tmp_path / "out"
    argv = ["compress", "-m", str(tiny_folder), "--sweep", str(sweep), "-o", str(out), "--data", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: error: sweep entry 'gptq': calibration file wiki.test.raw is a test split")
    assert err.endswith("; no artifact written") and "\n" not in err
    assert not out.exists()


def test_a_system_message_with_raw_is_refused_before_the_load(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # --raw skips the chat template, so --system was dropped without a word
    def no_load(*args: object, **kw: object) -> None:
        raise AssertionError("the flags are checked before the model loads")

    monkeypatch.setattr("kiln.model.load.load", no_load)
    assert cli.main(["generate", "hi", "--raw", "--system", "Answer in French"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--raw" in error and "--system" in error


def test_speculate_below_one_is_refused_before_the_load(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # it was refused only by the drafter, once the model and the draft had both loaded
    def no_load(*args: object, **kw: object) -> None:
        raise AssertionError("the flags are checked before the model loads")

    monkeypatch.setattr("kiln.model.load.load", no_load)
    assert cli.main(["generate", "hi", "--temperature", "0", "--draft", "default", "--speculate", "0"]) == 2
    assert capsys.readouterr().err == "kiln: error: --speculate 0 must be at least 1\n"


def test_speculate_without_a_draft_is_refused_before_the_load(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # --speculate only sizes --draft's proposals: alone it was ignored without a word
    def no_load(*args: object, **kw: object) -> None:
        raise AssertionError("the flags are checked before the model loads")

    monkeypatch.setattr("kiln.model.load.load", no_load)
    assert cli.main(["generate", "hi", "--speculate", "7"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--speculate 7" in error and "--draft" in error


@pytest.mark.parametrize("prompt, stdin", [("", ""), ("  ", ""), ("-", ""), ("-", "\n")])
def test_an_empty_prompt_is_refused_before_the_load(prompt: str, stdin: str, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # through the chat template a blank message was wrapped and answered (--raw already refused it)
    import io

    def no_load(*args: object, **kw: object) -> None:
        raise AssertionError("the prompt is checked before the model loads")

    monkeypatch.setattr("kiln.model.load.load", no_load)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert cli.main(["generate", prompt]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the prompt is empty; pass some text" in error


def test_a_max_tokens_past_the_context_is_refused_and_no_flag_runs_to_its_end(
        tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --max-tokens 30 after 56 prompt tokens in the 64-token context ran and ended with "length" after 8 tokens
    prompt = "hello " * 55
    assert cli.main(["generate", "-m", str(tiny_folder), "--raw", "--json", "--max-tokens", "30", prompt]) == 2
    assert capsys.readouterr().err == (
        "kiln: error: the prompt has 56 tokens and --max-tokens is 30, 86 in all, more than the model's context of "
        "64 tokens; shorten the prompt or pass --max-tokens 8 or less\n")
    assert cli.main(["generate", "-m", str(tiny_folder), "--raw", "--json", "--temperature", "0", prompt]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["prompt_tokens"], answer["completion_tokens"]) == (56, 8)  # the default 256, cut at the context


def test_json_cut_short_by_max_tokens_is_noted(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # it printed '{"a": "' and ended with status 0 and nothing on stderr, as if the JSON were whole
    schema = '{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}'
    assert cli.main(["generate", "-m", str(tiny_folder), "--raw", "--json-schema", schema, "--max-tokens", "2",
                     "hi"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("{")
    assert captured.err == ("kiln: note: the output reached --max-tokens before its JSON was complete, so it does "
                            "not match the schema; raise --max-tokens\n")


def test_a_schema_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    # json.loads ran out of stack: a RecursionError traceback. Which reader gives up first, Python's JSON reader
    # or the grammar compiler's, depends on the interpreter's recursion limit (a test run may have raised it)
    from kiln.errors import InvalidParameterError

    schema = '{"type": "integer"}'
    for _ in range(1200):
        schema = '{"type": "array", "items": ' + schema + "}"
    (tmp_path / "deep.json").write_text(schema)
    with pytest.raises(InvalidParameterError, match=r"nests too deeply to be read; flatten it"):
        cli._json_schema_grammar(str(tmp_path / "deep.json"))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # Python's reader reads it whole: the grammar compiler's limit is met instead
    try:
        with pytest.raises(InvalidParameterError, match=r"^the JSON schema nests too deeply to be read; flatten it"):
            cli._json_schema_grammar(str(tmp_path / "deep.json"))
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("value", ["[]", "true", "3", '"text"'])
def test_inline_json_that_is_not_an_object_is_refused_as_such(value: str) -> None:
    # it was read as a file name, and refused as "neither inline JSON nor a readable file"
    from kiln.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"^--json-schema must be a JSON object \(a schema\)"):
        cli._json_schema_grammar(value)


def test_ctrl_c_while_generate_streams_ends_the_text_s_line(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # the streamed words had no line end, so the terminal showed "Once upon akiln: interrupted"
    from kiln.engine.generate import Generator

    def streams_then_ctrl_c(self: Generator, prompts: object, params: object, on_text: object = None) -> None:
        assert callable(on_text)
        on_text(0, "Once upon a")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_end_on_next_ctrl_c", lambda: None)  # leaves pytest's SIGINT handler alone
    monkeypatch.setattr(Generator, "generate", streams_then_ctrl_c)
    assert cli.main(["generate", "hi", "--runtime", "torch"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "Once upon a\n" and captured.err == "kiln: interrupted\n"


def test_generate_sends_an_empty_system_message(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # --system "" was dropped, and the template's default system prompt was sent in its place
    from kiln.engine.generate import Generator

    prompts: list[list[int]] = []

    def records_the_prompt(self: Generator, batch: list[list[int]], params: object, on_text: object = None) -> None:
        prompts.extend(batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_end_on_next_ctrl_c", lambda: None)  # leaves pytest's SIGINT handler alone
    monkeypatch.setattr(Generator, "generate", records_the_prompt)
    assert cli.main(["generate", "hi", "--system", "", "--runtime", "torch"]) == 130
    from kiln.model.load import load_tokenizer

    text = load_tokenizer()[1].decode(prompts[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi") and "SmolLM" not in text


@pytest.mark.parametrize("flag, value", [("--kv-budget-mb", "nan"), ("--kv-budget-mb", "inf"), ("--kv-budget-mb", "-1"),
                                         ("--max-running", "0"), ("--max-batch-tokens", "0"), ("--speculate", "3")])
def test_a_serve_sizing_flag_out_of_range_is_one_line_naming_it(flag: str, value: str, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # nan was a ValueError traceback; -1 and 0 were refused naming kv_budget_bytes / max_running, not the flag;
    # --speculate without --draft was ignored without a word
    def no_serve(*args: object, **kw: object) -> None:
        raise AssertionError("the flags are checked before the server starts")

    monkeypatch.setattr("kiln.serve.app.serve", no_serve)
    assert cli.main(["serve", flag, value]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"kiln: error: {flag} ")
