from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kiln import files
from kiln.errors import InvalidParameterError


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_replace_folder_keeps_the_last_good_output_until_the_new_one_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _folder(tmp_path / "artifact", "old")
    files.replace_folder(_folder(tmp_path / "new", "new"), out)
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    # a Ctrl-C between moving the old folder aside and moving the new one in: the old one still exists
    real, calls = os.replace, []

    def interrupted(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.replace_folder(_folder(tmp_path / "newer", "newer"), out)
    kept = [p for p in tmp_path.iterdir() if (p / "weights").is_file() and (p / "weights").read_text() == "new"]
    assert kept == [out]  # back in its place (deleting it first, as before, lost it; then it stayed aside)


def test_write_text_leaves_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profile.json"
    files.write_text(path, '{"old": 1}')
    real = Path.write_text

    def half(self: Path, text: str) -> int:
        real(self, text[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def _read_fifo(path: Path) -> tuple[list[str], threading.Thread]:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(path.read_text()))
    reader.start()
    return got, reader


def test_a_stream_is_written_into_and_a_link_keeps_pointing_at_its_file(tmp_path: Path) -> None:
    # `-o /dev/stdout` renamed the finished file over the link in /dev (as root, `-o /dev/full` over the device)
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got, reader = _read_fifo(fifo)
    files.write_text(fifo, "page")
    reader.join(5)
    assert got == ["page"] and stat.S_ISFIFO(fifo.stat().st_mode)
    target, link = tmp_path / "report.html", tmp_path / "latest.html"
    target.write_text("old")
    link.symlink_to(target)
    files.write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_feedback_export_into_a_stream_or_through_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import stat

    from kiln import cli

    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got, reader = _read_fifo(fifo)
    assert cli.main(["feedback", "export", "-o", str(fifo)]) == 0
    reader.join(5)
    out, err = capsys.readouterr()
    # the count goes to stderr when the records went to a stream (stdout would have mixed it into the JSONL)
    assert got == [""] and stat.S_ISFIFO(fifo.stat().st_mode) and out == "" and "wrote 0 records" in err
    target, link = tmp_path / "records.jsonl", tmp_path / "latest.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    assert cli.main(["feedback", "export", "-o", str(link)]) == 0
    assert link.is_symlink() and target.read_text() == ""


def test_an_output_that_cannot_be_made_is_refused_before_any_work(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # under a file, or in a read-only folder: found only once the finished output moved in, after the build
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidParameterError, match="under .*notes.txt, which is a file"):
        files.check_replaceable(tmp_path / "notes.txt" / "out" / "more", "marker", "export")
    files.check_replaceable(tmp_path / "new" / "out", "marker", "export")  # an ordinary new folder is fine
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(InvalidParameterError, match=f"cannot be written \\({tmp_path} is read-only\\)"):
        files.check_replaceable(tmp_path / "new" / "out", "marker", "export")
