"""Deployments load on a thread of their own that ends once the model is built."""

from __future__ import annotations

import threading

import pytest

from kiln.serve.deploy import in_passing_thread


def test_result_comes_from_a_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []

    def build() -> int:
        seen.append(threading.current_thread())
        return 42

    assert in_passing_thread(build) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_errors_reach_the_caller() -> None:
    def broken() -> None:
        raise ValueError("model file is truncated")

    with pytest.raises(ValueError, match="truncated"):
        in_passing_thread(broken)


def test_auto_runtime_is_resolved_for_each_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """--runtime auto reaches every model a server loads (an int4 artifact first must not hold an fp32
    model to onnxruntime); a named runtime reaches every model as named."""
    from types import SimpleNamespace

    from kiln.engine.engine import EngineConfig
    from kiln.serve import deploy

    asked: list[str] = []

    def fake_start(name: str, version: str, source: str, engine: object, precision: object, runtime: str,
                   draft: object) -> object:
        asked.append(runtime)
        return SimpleNamespace(runtime="onnxruntime" if runtime == "auto" else runtime, live=None, retire=lambda: None)

    monkeypatch.setattr(deploy, "start", fake_start)
    monkeypatch.setattr(deploy, "load_version", lambda source: "v1")
    router = deploy.Router(EngineConfig(), "fp32", runtime="auto")
    router.add_static("int4-artifact")
    router.add_static("default")
    assert asked == ["auto", "auto"]
    named = deploy.Router(EngineConfig(), "fp32", runtime="torch")
    named.add_static("int4-artifact")
    named.add_static("default")
    assert asked[-2:] == ["torch", "torch"]
