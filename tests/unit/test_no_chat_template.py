"""A model without a chat template: chat refuses at once with a fix that exists, generate and completions work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kiln.cli import main
from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig


@pytest.fixture(scope="module")
def plain_folder(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("no-template")
    for f in tiny_folder.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_refuses_before_the_prompt_and_names_a_command_that_exists(
        plain_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chat", "-m", str(plain_folder), "--runtime", "torch"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no chat template" in err and "kiln generate" in err and "--raw" not in err


def test_generate_sends_plain_text(plain_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "-m", str(plain_folder), "hello", "--max-tokens", "3", "--temperature", "0",
                 "--runtime", "torch"])
    assert code == 0 and "no chat template" in capsys.readouterr().err


def test_server_answers_chat_with_400_pointing_at_completions(plain_folder: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              ready_client: Any) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(plain_folder),), kv_budget_bytes=4 << 20))
    with ready_client(app) as client:
        name = client.get("/v1/models").json()["data"][0]["id"]
        chat = client.post("/v1/chat/completions",
                           json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 400
        message = chat.json()["error"]["message"]
        assert "no chat template" in message and "/v1/completions" in message and "--raw" not in message
        plain = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        assert plain.status_code == 200 and plain.json()["choices"][0]["text"] is not None
