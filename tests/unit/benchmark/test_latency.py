"""How `kiln bench` turns one batch's outputs into figures (no timings measured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.benchmark.latency import measure_once, peak_rss_bytes, reset_peak_rss
from kiln.engine.generate import GenerationOutput


def output(prompt_tokens: int, ttft_ms: float, times: list[float]) -> GenerationOutput:
    return GenerationOutput(text="", token_ids=[1] * len(times), prompt_tokens=prompt_tokens,
                            finish_reason="length", ttft_ms=ttft_ms, prefill_tokens_per_s=0.0,
                            decode_tokens_per_s=10.0, token_times=times)


def test_batch_prefill_rate_counts_until_the_last_prompt_is_prefilled() -> None:
    # two 500-token prompts prefilled in chunks: the first is done after 0.5 s, the second after 1 s
    outs = [output(500, 500.0, [0.5, 0.9, 1.1, 1.2]), output(500, 1000.0, [1.0, 1.1, 1.2])]
    figures = measure_once(outs, batch_size=2)
    assert figures["prefill_tokens_per_s"] == 1000.0  # 1000 tokens in 1 s, not in 0.5 s
    assert figures["ttft_ms"] == 750.0  # median over the batch
    # decode counts from the last first token (1.0 s): 2 tokens in 0.2 s on each row
    assert figures["decode_tokens_per_s"] == pytest.approx(10.0)
    assert figures["total_decode_tokens_per_s"] == pytest.approx(20.0)
    assert abs(figures["itl_ms_p50"] - 100.0) < 1e-9


def test_a_reset_peak_forgets_what_came_before() -> None:
    # kiln bench measures serving memory this way: loading's peak (two copies of the model) must not count
    import mmap
    import re
    from pathlib import Path

    def resident() -> int:
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    start = resident()
    # a mapping of its own: new pages, where a bytearray could reuse heap the process already holds (it did, in
    # the whole suite), and pages that closing gives back
    block = mmap.mmap(-1, 300 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    assert peak_rss_bytes() >= start + 250 * 2**20
    block.close()
    assert reset_peak_rss()
    assert peak_rss_bytes() < start + 100 * 2**20  # the process's earlier peak (other tests' models) is gone too


def test_a_prompt_and_new_tokens_beyond_the_context_are_refused() -> None:
    # the engine stopped each sequence at the context: 8190 + 8 ran 2 new tokens and reported them as 8
    from types import SimpleNamespace

    from kiln.benchmark.latency import BenchOptions, run
    from kiln.errors import ContextLengthError

    loaded = SimpleNamespace(spec=SimpleNamespace(max_position=64))
    with pytest.raises(ContextLengthError, match="--prompt-tokens 60 \\+ --new-tokens 8 .* context of 64"):
        run(loaded, BenchOptions(prompt_tokens=60, new_tokens=8, batch_sizes=(1,), runs=1))  # type: ignore[arg-type]


def test_a_data_folder_without_the_prompts_is_refused(tmp_path: Path) -> None:
    # --data DIR named a folder without WikiText-2: the bench ran on random token ids with exit 0
    from kiln.benchmark.latency import BenchOptions
    from kiln.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match=f"wiki.test.raw not found under {tmp_path}"):
        BenchOptions(data_dir=tmp_path)
    assert BenchOptions(data_dir=None).data_dir is None  # left out, the shared data (or random ids) still serve


def test_a_batch_size_named_twice_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # 1,4,1 ran batch 1 twice and recorded two rows for it, of which the report read only the first
    from kiln import cli

    monkeypatch.setenv("KILN_HOME", str(tmp_path))

    assert cli.main(["bench", "--batch-sizes", "1,4,1,4,8", "--runs", "1", "--prompt-tokens", "4",
                     "--new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "kiln: error: --batch-sizes names 1, 4 more than once; name each batch size once\n"


def test_a_batch_whose_cache_cannot_fit_the_memory_is_refused(default_model: object,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # the engine sized its cache for the whole batch: --batch-sizes 100000 asked for 2.9 TB of keys and values
    from kiln.benchmark import latency
    from kiln.benchmark.latency import BenchOptions

    monkeypatch.setattr(latency, "available_bytes", lambda: 10_000_000)
    options = BenchOptions(prompt_tokens=32, new_tokens=2, batch_sizes=(1, 8), runs=1)
    with pytest.raises(latency.InvalidParameterError,
                       match=r"--batch-sizes 8 needs 13 MB of keys and values for 34 tokens a sequence, "
                             r"more than the 10 MB of memory available; pass smaller batch sizes"):
        latency.run(default_model, options)  # type: ignore[arg-type]
