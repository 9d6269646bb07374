"""The runs database stores each result in one transaction and finds it by model name or hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import runs
from kiln.errors import DataFormatError


def make(model: str, sha: str, task: str) -> runs.Run:
    return runs.Run(kind="eval", model=model, model_sha256=sha, model_size_bytes=10, task=task,
                    settings={"limit": 5}, metrics={"acc": 0.5}, versions={"torch": "x"}, duration_s=1.5,
                    worst=[{"index": 3}])


def test_add_and_query(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    first = runs.add(make("default", "abc123", "piqa"), db)
    runs.add(make("other", "def456", "hellaswag"), db)
    assert first == 1
    assert [r.task for r in runs.query(path=db)] == ["piqa", "hellaswag"]
    found = runs.query(model="abc", path=db)
    assert len(found) == 1 and found[0].metrics == {"acc": 0.5} and found[0].worst == [{"index": 3}]
    assert runs.query(model="other", path=db)[0].model_sha256 == "def456"
    assert runs.query(kind="bench", path=db) == []
    assert runs.query(model="%", path=db) == runs.query(model="_bc", path=db) == []  # not LIKE patterns


def test_a_damaged_database_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    db = tmp_path / "runs.sqlite"
    db.write_text("not a database")
    with pytest.raises(DataFormatError, match="move it aside"):
        runs.query(path=db)
    with pytest.raises(DataFormatError, match="not a usable runs database"):
        runs.add(make("default", "abc123", "piqa"), db)
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    # eval checks the database before loading the model (missing here), so no evaluation is lost
    for argv in (["runs"], ["eval", "-m", str(tmp_path / "missing"), "--task", "piqa"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "runs.sqlite is not a usable runs database" in err
    assert db.read_text() == "not a database"


def test_a_folder_in_the_way_of_the_database_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # a folder named runs.sqlite, or KILN_HOME naming a file, ended kiln runs and kiln eval in a traceback
    from kiln.cli import main

    (tmp_path / "home" / "runs.sqlite").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("keep me")
    for home, says in ((tmp_path / "home", "runs.sqlite is not a usable runs database"),
                       (tmp_path / "notes.txt", "set KILN_HOME to a writable folder")):
        monkeypatch.setenv("KILN_HOME", str(home))
        for argv in (["runs"], ["eval", "-m", str(tmp_path / "missing"), "--task", "piqa"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and says in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_run_key_is_stored_once(tmp_path: Path) -> None:
    # a resumed eval stores its result again under the key of the run that may have stored it already
    import sqlite3

    db = tmp_path / "runs.sqlite"
    with sqlite3.connect(db) as conn:  # a database from before run keys
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, kind TEXT"
                     " NOT NULL, model TEXT NOT NULL, model_sha256 TEXT NOT NULL, model_size_bytes INTEGER NOT NULL,"
                     " task TEXT NOT NULL, settings TEXT NOT NULL, metrics TEXT NOT NULL, versions TEXT NOT NULL,"
                     " duration_s REAL NOT NULL, worst TEXT NOT NULL DEFAULT '[]')")
    first = runs.add(make("default", "abc123", "piqa"), db)  # no key: bench, or a database from before
    keyed = make("default", "abc123", "piqa")
    keyed.run_key = "k1"
    assert runs.add(keyed, db) == runs.add(keyed, db) == first + 1
    assert runs.add(make("default", "abc123", "piqa"), db) == first + 2
    assert [r.run_key for r in runs.query(path=db)] == [None, "k1", None]


def test_a_database_with_a_column_this_kiln_cannot_fill_is_refused_before_the_work(tmp_path: Path) -> None:
    # a newer kiln's table with a required column: reading worked, and the INSERT of a finished evaluation
    # ended in an IntegrityError traceback
    import sqlite3

    db = tmp_path / "runs.sqlite"
    runs.add(make("default", "abc123", "piqa"), db)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE runs ADD COLUMN extra TEXT NOT NULL DEFAULT 'x'")  # with a default: fillable
    runs.add(make("default", "abc123", "arc_easy"), db)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE runs")
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, created_at TEXT, kind TEXT, model TEXT, "
                     "model_sha256 TEXT, model_size_bytes INTEGER, task TEXT, settings TEXT, metrics TEXT, "
                     "versions TEXT, duration_s REAL, worst TEXT, run_key TEXT, tokens INTEGER NOT NULL)")
    assert runs.query(path=db) == []  # read, it is still listed
    with pytest.raises(DataFormatError, match=r"runs.sqlite: its runs table requires the column\(s\) tokens, "
                                              r"which this kiln does not know .*set KILN_HOME to another folder"):
        runs.check(db)
    with sqlite3.connect(db) as conn:  # one without a column kiln reads: an IndexError from the listing
        conn.execute("ALTER TABLE runs DROP COLUMN worst")
    with pytest.raises(DataFormatError, match=r"its runs table lacks the column\(s\) worst"):
        runs.query(path=db)


def test_nan_figures_are_null_in_printed_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # a model with NaN outputs has a NaN perplexity, printed as NaN: jq and JSON.parse refuse the whole output
    import json

    from kiln import cli
    from kiln.evaluate import summary
    from kiln.evaluate.runner import EvalOutcome

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    run = make("broken", "abc123", "wikitext2")
    run.metrics = {"ppl": float("nan"), "ppl_stderr": float("inf")}
    runs.add(run)
    assert cli.main(["runs", "--json"]) == 0
    listed = strict(capsys.readouterr().out)
    assert listed[0]["metrics"] == {"ppl": None, "ppl_stderr": None}  # type: ignore[index]
    outcome = EvalOutcome("wikitext2", "perplexity", run.metrics, [{"index": 0, "score": float("nan")}], 1.0)
    assert strict(summary.as_json(outcome, "broken", "abc123"))["ppl"] is None  # type: ignore[index]
    summary.write_samples(outcome, tmp_path / "samples.jsonl")
    assert strict((tmp_path / "samples.jsonl").read_text())["score"] is None  # type: ignore[index]


def test_an_empty_listing_names_its_filters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from kiln import cli

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    runs.add(make("default", "abc123", "piqa"))
    assert cli.main(["runs", "--kind", "bench", "--model", "default"]) == 0
    assert capsys.readouterr().out == f"no bench runs recorded in {tmp_path / 'runs.sqlite'} for 'default'\n"
