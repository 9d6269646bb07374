"""The registry's command line: names and versions a client can ask for, and listings that say what they found."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln import cli
from kiln.serve import registry


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "resolve", lambda path: SimpleNamespace(sha256="ab" * 32))
    return tmp_path


@pytest.mark.parametrize("argv,what", [
    (["add", "", "m"], "a model name must be 1-128 printable characters without spaces, not ''"),
    (["add", "my chat", "m"], "a model name must be 1-128 printable characters without spaces, not 'my chat'"),
    (["add", "chat\x1b[2J", "m"], "a model name must be"),
    (["add", "chat", "m", "--version", ""], "a version label must be 1-128 printable characters without spaces"),
])
def test_a_name_or_version_a_client_cannot_ask_for_is_refused(argv: list[str], what: str, home: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # `add ""` was registered, and as a candidate: the empty name listed every model's versions, chat's live one too
    assert cli.main(["registry", "add", "chat", "m", "--version", "v1"]) == 0
    capsys.readouterr()
    assert cli.main(["registry", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and what in err
    assert [(v.name, v.version) for v in registry.Registry().versions()] == [("chat", "v1")]


def test_listings_say_when_they_found_nothing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["registry", "list"]) == 0
    assert "no models registered in" in capsys.readouterr().out
    assert cli.main(["registry", "add", "chat", "m", "--version", "v1"]) == 0
    capsys.readouterr()
    # a misspelt name printed nothing and exited 0, as if the model had no versions
    assert cli.main(["registry", "list", "caht"]) == 2
    assert "the registry has no model 'caht' (models: chat)" in capsys.readouterr().err
    assert cli.main(["registry", "list", "chat"]) == 0
    assert capsys.readouterr().out.startswith("chat ")
    assert registry.Registry().versions("") == []
