"""The requests database stores redacted requests, takes ratings, exports JSONL, and survives concurrent writers."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from kiln.cli import main
from kiln.errors import InvalidParameterError
from kiln.serve.feedback import FeedbackStore, db_path, redact_json

CHAT = {
    "model": "tiny",
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "I am jane@example.com, call 555-123-4567"},
    ],
    "temperature": 0.7,
    "max_tokens": 64,
    "stream": False,
}
COMPLETION = {"model": "tiny", "prompt": "Card 4111 1111 1111 1111 expires", "max_tokens": 8, "stop": ["\n"]}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "requests.sqlite")


def test_redact_json_keeps_keys_and_numbers() -> None:
    body = {"a@example.com": "write to b@example.com", "n": 5, "x": 1.5, "ok": True, "none": None,
            "list": ["555-123-4567", 7, {"deep": "4111111111111111"}]}
    assert redact_json(body) == {"a@example.com": "write to [EMAIL]", "n": 5, "x": 1.5, "ok": True, "none": None,
                                 "list": ["[PHONE]", 7, {"deep": "[CARD]"}]}
    assert body["list"][0] == "555-123-4567"  # a copy, the caller's request is unchanged


def test_log_request_stores_redacted_request_and_response(store: FeedbackStore) -> None:
    store.log_request("chatcmpl-1", "tiny", "v1", CHAT, "Sure, mail me at bob@example.org", 12, 5)
    conn = sqlite3.connect(store.path)
    try:
        row = conn.execute("SELECT model, version, request, response, prompt_tokens, completion_tokens, created_at,"
                           " rating FROM requests WHERE id = 'chatcmpl-1'").fetchone()
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    model, version, request, response, prompt_tokens, completion_tokens, created_at, rating = row
    assert (model, version, prompt_tokens, completion_tokens, rating) == ("tiny", "v1", 12, 5, None)
    assert json.loads(request)["messages"][1]["content"] == "I am [EMAIL], call [PHONE]"
    assert json.loads(request)["temperature"] == 0.7
    assert response == "Sure, mail me at [EMAIL]"
    assert created_at.endswith("+00:00")
    assert journal == "wal"
    assert "jane@example.com" not in store.path.read_bytes().decode("latin-1")


def test_repeated_response_id_is_refused(store: FeedbackStore) -> None:
    store.log_request("id-1", "tiny", "v1", CHAT, "a", 1, 1)
    with pytest.raises(sqlite3.IntegrityError):
        store.log_request("id-1", "tiny", "v1", CHAT, "b", 1, 1)


def test_add_feedback(store: FeedbackStore) -> None:
    store.log_request("id-1", "tiny", "v1", CHAT, "answer", 3, 4)
    assert store.add_feedback("id-1", 4, "great, but write to me at jane@example.com") is True
    assert store.add_feedback("id-1", 4.5, None) is True  # a later rating replaces the earlier one
    assert store.add_feedback("unknown", 3, "who?") is False
    out = store.path.parent / "out.jsonl"
    store.export(out)
    assert [(r["rating"], r["comment"]) for r in read_jsonl(out)] == [(4.5, None)]
    store.add_feedback("id-1", -1, "call 555-123-4567")
    store.export(out)
    assert [(r["rating"], r["comment"]) for r in read_jsonl(out)] == [(-1, "call [PHONE]")]


@pytest.mark.parametrize("rating", [-1.5, 5.01, 6, float("nan"), float("inf"), True, "5", None])
def test_bad_ratings_are_refused(store: FeedbackStore, rating: Any) -> None:
    store.log_request("id-1", "tiny", "v1", CHAT, "answer", 3, 4)
    with pytest.raises(InvalidParameterError, match="from -1 to 5"):
        store.add_feedback("id-1", rating, None)


def test_export_round_trip(store: FeedbackStore, tmp_path: Path) -> None:
    store.log_request("chatcmpl-1", "tiny", "v1", CHAT, "Hello!", 12, 2)
    store.log_request("cmpl-2", "tiny", "v2", COMPLETION, "next month", 6, 2)
    store.log_request("chatcmpl-3", "other", "v1", CHAT, "Hi again", 12, 3)
    store.add_feedback("cmpl-2", 5, "spot on")

    out = tmp_path / "nested" / "all.jsonl"
    assert store.export(out) == 3
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["chatcmpl-1", "cmpl-2", "chatcmpl-3"]
    chat, completion = records[0], records[1]
    assert set(chat) == {"id", "model", "version", "created_at", "messages", "response", "rating", "comment"}
    assert chat["messages"] == redact_json(CHAT["messages"])
    assert (chat["response"], chat["rating"], chat["comment"]) == ("Hello!", None, None)
    assert set(completion) == {"id", "model", "version", "created_at", "prompt", "response", "rating", "comment"}
    assert completion["prompt"] == "Card [CARD] expires"
    assert (completion["version"], completion["rating"], completion["comment"]) == ("v2", 5, "spot on")

    rated = tmp_path / "rated.jsonl"
    assert store.export(rated, only_rated=True) == 1
    assert read_jsonl(rated) == [completion]
    assert not list(tmp_path.rglob("*.partial"))


def test_export_of_empty_store_writes_empty_file(store: FeedbackStore, tmp_path: Path) -> None:
    out = tmp_path / "empty.jsonl"
    assert store.export(out) == 0
    assert out.read_text() == ""


def test_export_keeps_a_users_file_named_like_its_temporary_one(store: FeedbackStore, tmp_path: Path) -> None:
    # the export wrote OUT.partial and removed it: a file of the user's with that name was overwritten, then gone
    mine = tmp_path / "out.jsonl.partial"
    mine.write_text("keep")
    store.export(tmp_path / "out.jsonl")
    assert mine.read_text() == "keep"


def test_export_to_unwritable_path_is_a_kiln_error(store: FeedbackStore, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InvalidParameterError, match="cannot write"):
        store.export(blocker / "out.jsonl")


def test_default_path_is_under_kiln_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    assert db_path() == tmp_path / "home" / "requests.sqlite"
    FeedbackStore().log_request("id-1", "tiny", "v1", COMPLETION, "x", 1, 1)
    assert (tmp_path / "home" / "requests.sqlite").is_file()


def test_concurrent_writers(store: FeedbackStore, tmp_path: Path) -> None:
    num_threads, per_thread = 8, 25
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per_thread):
                rid = f"t{t}-{i}"
                store.log_request(rid, "tiny", "v1", CHAT, f"reply {i} to a@example.com", 10, i)
                if i % 2 == 0:
                    assert store.add_feedback(rid, i % 6, f"thread {t}")
                if i % 10 == 0:  # readers run alongside the writers
                    store.export(tmp_path / f"snapshot-{t}.jsonl")
        except BaseException as exc:  # collected so the main thread can fail the test with it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    out = tmp_path / "all.jsonl"
    assert store.export(out) == num_threads * per_thread
    records = read_jsonl(out)
    assert len({r["id"] for r in records}) == num_threads * per_thread
    assert all(r["response"].endswith("[EMAIL]") for r in records)
    assert store.export(out, only_rated=True) == num_threads * ((per_thread + 1) // 2)


def test_cli_feedback_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    store = FeedbackStore()
    store.log_request("id-1", "tiny", "v1", CHAT, "a", 1, 1)
    store.log_request("id-2", "tiny", "v1", CHAT, "b", 1, 1)
    store.add_feedback("id-2", 3, None)
    out = tmp_path / "fb.jsonl"
    assert main(["feedback", "export", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"kiln: wrote 2 records to {out}"
    assert main(["feedback", "export", "-o", str(out), "--rated-only"]) == 0
    assert capsys.readouterr().out.strip() == f"kiln: wrote 1 records to {out}"
    assert [r["id"] for r in read_jsonl(out)] == ["id-2"]
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert main(["feedback", "export", "-o", str(blocker / "x.jsonl")]) == 2
    assert "kiln: error: cannot write" in capsys.readouterr().err


def test_a_rating_out_of_range_is_a_400_naming_the_rating_field(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app
    from kiln.serve.state import ServeConfig

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    client = TestClient(create_app(ServeConfig(log_requests=True)))
    r = client.post("/v1/feedback", json={"id": "chatcmpl-1", "rating": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating", r.text  # param was null
