from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln import files


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
