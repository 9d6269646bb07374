"""The report: Pareto fronts, a self-contained page from the runs database, and a real browser rendering it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kiln import runs
from kiln.errors import InvalidParameterError
from kiln.report import html
from kiln.report.plots import pareto_front
from kiln.report.select import Budget, choose


def test_pareto_front() -> None:
    # (size, ppl): lower is better on both
    points = [(100, 20.0), (50, 25.0), (120, 21.0), (60, 24.0), (40, 40.0)]
    assert sorted(pareto_front(points, True, True)) == [0, 1, 3, 4]
    # (speed, ppl): higher speed better, lower ppl better
    assert sorted(pareto_front([(10, 20.0), (20, 22.0), (15, 25.0)], False, True)) == [0, 1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    for name, sha, size, ppl, speed in (("fp32", "a" * 64, 538e6, 23.5, 36.0), ("int8", "b" * 64, 140e6, 23.6, 90.0),
                                        ("int4", "c" * 64, 80e6, 26.0, 120.0)):
        common = dict(model=name, model_sha256=sha, model_size_bytes=int(size), versions={}, duration_s=1.0)
        runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": ppl, "ppl_stderr": 0.4},
                          worst=[{"index": 7, "score": -3.5, "input": "a <b>bold</b> chunk", "target": ""}],
                          **common))
        runs.add(runs.Run(kind="eval", task="piqa", settings={}, metrics={"acc": 0.65, "acc_norm": 0.66}, **common))
        bench_settings = {"runtime": "onnxruntime"} if name == "int4" else {}  # older runs recorded no runtime
        runs.add(runs.Run(kind="bench", task="bench", settings=bench_settings, metrics={"results": [
            {"batch_size": 1, "decode_tokens_per_s": speed, "ttft_ms": 500.0, "peak_rss_bytes": 9e8}]}, **common))
    return tmp_path


def test_page_is_self_contained(home: Path) -> None:
    page = html.render()
    assert page.count("<svg") == 2 and "<tr>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # item text is escaped
    assert "+0.43%" in page  # Δppl of int8 against the first model
    assert "120.0 (onnxruntime)" in page and "36.0 (" not in page  # the runtime behind a speed, where recorded
    only = html.render(models=["int4"])
    assert "int4" in only and "(aaaaaaaaaa)" not in only


def test_results_scored_through_a_server_sit_beside_the_in_process_ones(home: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # a later `kiln eval --api` of the same model must not take the place of kiln's own figure in the table
    # or the choice: it is shown beside it, as the cross-check it is
    from kiln import cli
    from kiln.report.collect import collect

    runs.add(runs.Run(kind="eval", model="int8", model_sha256="b" * 64, model_size_bytes=140_000_000,
                      task="wikitext2", settings={"api": "http://127.0.0.1:8000", "api_model": "int8"},
                      metrics={"ppl": 99.0, "ppl_stderr": 0.4}, versions={}, duration_s=1.0))
    int8 = next(m for m in collect() if m.name == "int8")
    assert int8.metric("wikitext2", "ppl") == 23.6 and int8.served["wikitext2"].metrics["ppl"] == 99.0
    page = html.render()
    served = page[page.index('<table id="served">'):]
    assert "http://127.0.0.1:8000" in served and "23.6000" in served and "99.0000" in served
    assert "99.000" not in page[: page.index('<table id="served">')]
    assert cli.main(["runs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-1].endswith("ppl 99  (via http://127.0.0.1:8000)") and "(via" not in listed[0]


def test_nothing_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    with pytest.raises(InvalidParameterError, match="no runs recorded"):
        html.render()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("KILN_REQUIRE_BROWSER"),
                    reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_headless_chromium_renders_the_report(home: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = html.write(tmp_path / "report.html")
    base = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr>") >= 4 and "quality against size" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "the screenshot is blank"
    orange = sum(n for n, (r, g, b) in colours if r > 200 and 60 < g < 110 and b < 60)
    assert orange > 20, "the Pareto front markers are not drawn"


def test_distilled_artifact_shows_its_loss_curve(home: Path, tmp_path: Path) -> None:
    from kiln.artifact.manifest import Manifest

    student = tmp_path / "student"
    student.mkdir()
    Manifest(source={"name": "default"}, recipe={},
             history={"distillation": {"steps": 30, "loss_curve": [[10, 8.4], [20, 4.4], [30, 2.1]]}}).write(student)
    runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": 90.0, "ppl_stderr": 2.0},
                      model=str(student), model_sha256="d" * 64, model_size_bytes=270_000_000, versions={},
                      duration_s=1.0))
    page = html.render()
    assert f"{student}: distillation loss" in page
    assert page.count("<svg") == 3  # the two Pareto plots and the curve


def test_best_is_the_smallest_in_memory_when_every_candidate_was_benched(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the demo's case: the default model is a small GGUF on disk that loads as fp32; the int4 artifact is
    # a little larger on disk and a fifth of it in memory
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    for name, sha, disk, ppl in (("default", "a" * 64, 98e6, 22.59), ("int4", "c" * 64, 108e6, 22.62)):
        common = dict(model=name, model_sha256=sha, model_size_bytes=int(disk), versions={}, duration_s=1.0)
        runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": ppl}, **common))
    choice = choose()
    assert choice.chosen == "default" and "on disk" in choice.reason  # no bench: disk sizes
    for name, sha, disk, memory in (("default", "a" * 64, 98e6, 538e6), ("int4", "c" * 64, 108e6, 108e6)):
        runs.add(runs.Run(kind="bench", task="bench", model=name, model_sha256=sha, model_size_bytes=int(disk),
                          versions={}, duration_s=1.0, settings={}, metrics={"bytes_in_memory": int(memory),
                                                                             "results": []}))
    choice = choose()
    assert choice.chosen == "int4" and "in memory" in choice.reason and "108 MB" in choice.reason


def test_a_budget_picks_the_least_loss_that_meets_it(home: Path) -> None:
    # fp32 23.5 ppl at 36 tok/s, int8 23.6 at 90, int4 26.0 (+10.6%) at 120; every peak RSS 900 MB
    assert choose().chosen == "int8"  # no resource limit: the smallest within +2%
    choice = choose(budget=Budget(min_tokens_per_s=50))
    assert choice.chosen == "int8" and "least perplexity" in choice.reason
    assert choice.rejected == {"fp32": "batch-1 decode 36.0 tok/s < 50 tok/s",
                               "int4": "perplexity +10.64% > +2%"}
    choice = choose(budget=Budget(max_ppl_increase_pct=15, min_tokens_per_s=100))
    assert choice.chosen == "int4"
    assert choose(budget=Budget(max_ppl_increase_pct=15, max_memory_mb=1000)).chosen == "fp32"  # least loss
    none = choose(budget=Budget(max_memory_mb=500))
    assert none.chosen is None and "no recorded model meets the budget" in none.reason
    assert none.rejected["int8"] == "peak RSS 900.0 MB > 500 MB"
    page = html.render(choice=choose(budget=Budget(min_tokens_per_s=50)))
    assert "Which one to serve" in page and "<code>int8</code>" in page and "36.0 tok/s &lt; 50 tok/s" in page


def test_a_budget_needs_the_measurements_it_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": 20.0}, model="m",
                      model_sha256="e" * 64, model_size_bytes=1, versions={}, duration_s=1.0))
    choice = choose(budget=Budget(max_ttft_ms=100))
    assert choice.chosen is None and "no time to first token recorded (run `kiln bench`" in choice.rejected["m"]
    with pytest.raises(InvalidParameterError, match="--min-tokens-per-s must be positive"):
        Budget(min_tokens_per_s=0)


@pytest.mark.parametrize("field,flag", [("max_ppl_increase_pct", "--max-ppl-increase"),
                                        ("max_memory_mb", "--max-memory-mb"),
                                        ("min_tokens_per_s", "--min-tokens-per-s"), ("max_ttft_ms", "--max-ttft-ms")])
def test_a_nan_limit_is_refused(field: str, flag: str) -> None:
    # NaN passed the range checks and every comparison with it, so any model met the budget
    with pytest.raises(InvalidParameterError, match=f"{flag} must be .* got nan"):
        Budget(**{field: float("nan")})  # type: ignore[arg-type]


def test_report_command_prints_the_choice_and_fails_an_unmet_budget(home: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kiln import cli

    out = tmp_path / "r.html"
    assert cli.main(["report", "-o", str(out), "--min-tokens-per-s", "50", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["chosen"] == "int8" and shown["report"] == str(out.resolve()) and out.is_file()
    assert cli.main(["report", "-o", str(out), "--max-memory-mb", "500"]) == 1
    err = capsys.readouterr().err
    assert "no recorded model meets the budget" in err and "fp32: peak RSS 900.0 MB > 500 MB" in err
    assert "Which one to serve" in out.read_text()  # the page is written all the same
    assert cli.main(["report", "-o", str(out), "--max-ttft-ms", "-1"]) != 0
    assert "--max-ttft-ms must be positive" in capsys.readouterr().err


def test_a_reference_that_is_none_of_the_models_is_refused(home: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # the first model stood in for it without a word: with --model int8 --model int4 --reference fp32, int4's
    # +10.6% was measured against int8 and the choice of model rested on it
    from kiln import cli

    assert choose(reference="int4").reference == "int4" and choose(reference="aaaa").reference == "fp32"
    with pytest.raises(InvalidParameterError, match=r"--reference 'nosuch' is none of the models in the report"):
        choose(reference="nosuch")
    out = tmp_path / "r.html"
    assert cli.main(["report", "-o", str(out), "--model", "int8", "--model", "int4", "--reference", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(int8, int4); pass one of them, or add it with --model" in err
    assert not out.exists()


def test_an_output_that_cannot_take_the_page_is_one_line(home: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # a folder given as -o ended in IsADirectoryError's traceback, a file in its path in FileExistsError's
    from kiln import cli

    (tmp_path / "notes.txt").write_text("keep me")
    for out, says in ((tmp_path, "is a folder; pass a file name such as"),
                      (tmp_path / "notes.txt" / "r.html", "cannot write the report")):
        assert cli.main(["report", "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert cli.main(["report", "-o", str(tmp_path / "r.html")]) == 0 and not list(tmp_path.glob(".*.partial"))
    assert "Δppl" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_report_command_reads_the_runs_once(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The page and the choice describe the same runs: a run recorded between two reads could make the page
    list a model the choice never saw."""
    from kiln import cli

    calls: list[int] = []
    query = runs.query

    def counted(*args: object, **kwargs: object) -> list[runs.Run]:
        calls.append(1)
        return query(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runs, "query", counted)
    assert cli.main(["report", "-o", str(tmp_path / "r.html")]) == 0
    assert len(calls) == 1 and "best model: int8" in capsys.readouterr().out


def test_the_memory_limit_reads_the_serving_peak_where_recorded(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # loading holds two copies for a moment: a model that serves in 400 MB meets a 500 MB limit even though
    # its process peaked at 900 MB while loading; a bench without the serving peak is judged on the 900 MB
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    for name, sha, serving in (("new", "a" * 64, 400e6), ("old", "b" * 64, None)):
        common = dict(model=name, model_sha256=sha, model_size_bytes=100, versions={}, duration_s=1.0)
        runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": 20.0}, **common))
        row = {"batch_size": 1, "decode_tokens_per_s": 50.0, "ttft_ms": 90.0, "peak_rss_bytes": 9e8}
        if serving is not None:
            row["serving_peak_rss_bytes"] = serving
        runs.add(runs.Run(kind="bench", task="bench", settings={}, metrics={"results": [row]}, **common))
    choice = choose(reference="new", budget=Budget(max_memory_mb=500))
    assert choice.chosen == "new" and choice.rejected == {"old": "peak RSS 900.0 MB > 500 MB"}
    assert "serving RSS 400.0 MB > 300 MB" in choose(budget=Budget(max_memory_mb=300)).rejected["new"]
    assert ">400 / 900<" in html.render()


def test_a_nan_perplexity_does_not_meet_the_budget(home: Path) -> None:
    # NaN passed "increase > limit", so a model whose outputs were NaN met every budget, and as the smallest
    # it was the one to serve
    runs.add(runs.Run(kind="eval", task="wikitext2", settings={}, metrics={"ppl": float("nan")}, model="broken",
                      model_sha256="d" * 64, model_size_bytes=1, versions={}, duration_s=1.0))
    choice = choose()
    assert choice.chosen == "int8" and "wikitext2 perplexity is NaN" in choice.rejected["broken"]
    against_it = choose(reference="broken")
    assert against_it.chosen is None and "pass another model as --reference" in against_it.reason


def test_a_lambada_column_appears_where_a_model_was_evaluated_on_it(home: Path) -> None:
    assert "lambada_openai" not in html.render()  # no model has it: no empty column
    runs.add(runs.Run(kind="eval", task="lambada_openai", settings={}, metrics={"acc": 0.292, "ppl": 56.078},
                      model="int8", model_sha256="b" * 64, model_size_bytes=140_000_000, versions={}, duration_s=1.0))
    page = html.render()
    assert "lambada_openai<br>acc / ppl" in page and "<td>29.2 / 56.08</td>" in page
    summary = page.split('<table id="summary">')[1].split("</table>")[0]
    rows = summary.split("<tbody>")[1].split("</tr>")[:-1]  # the models without it show "–" in that column
    assert len(rows) == 3 and all(row.count("<td") == summary.count("<th>") for row in rows)


def test_worst_items_show_what_the_model_gave_only_where_it_was_recorded(home: Path) -> None:
    common = dict(model="int8", model_sha256="b" * 64, model_size_bytes=140_000_000, versions={}, duration_s=1.0)
    runs.add(runs.Run(kind="eval", task="lambada_openai", settings={}, metrics={"acc": 0.292, "ppl": 56.078},
                      worst=[{"index": 3, "score": -9.1, "input": "he opened the", "target": " door"}], **common))
    runs.add(runs.Run(kind="eval", task="arc_easy", settings={}, metrics={"acc": 0.5, "acc_norm": 0.5},
                      worst=[{"index": 4, "score": -1.2, "input": "Q?", "target": "yes", "choices": ["yes", "no"],
                              "prediction_norm": 1}], **common))
    page = html.render(models=["int8"])
    tables = {title: table for title, table in re.findall(r"<h3>int8 · (\w+)</h3><table>(.*?)</table>", page, re.S)}
    assert set(tables) == {"wikitext2", "lambada_openai", "arc_easy"}
    # scored by likelihood alone: no answer to show, so no empty column
    for task in ("wikitext2", "lambada_openai"):
        assert "<th>got</th>" not in tables[task] and tables[task].count("<td") == 4
    assert "<th>got</th>" in tables["arc_easy"] and '<td class="name">no</td>' in tables["arc_easy"]
