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


def _fake_models(monkeypatch: pytest.MonkeyPatch, shas: dict[str, str]) -> list[str]:
    """Models as paths with a sha256 each (edit `shas` to change one's files); returns the versions started."""
    from types import SimpleNamespace

    from kiln.model import source
    from kiln.serve import deploy, registry

    def fake_resolve(path: str) -> object:
        return SimpleNamespace(sha256=shas[path])

    started: list[str] = []

    def fake_start(name: str, version: str, path: str, *args: object) -> object:
        started.append(version)
        return SimpleNamespace(name=name, version=version, retire=lambda: None)

    monkeypatch.setattr(registry, "resolve", fake_resolve)
    monkeypatch.setattr(source, "resolve", fake_resolve)
    monkeypatch.setattr(deploy, "start", fake_start)
    return started


def test_a_registry_version_whose_files_changed_since_add_is_not_served(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    from kiln.engine.engine import EngineConfig
    from kiln.errors import ModelFormatError
    from kiln.serve import deploy
    from kiln.serve.registry import Registry

    a, b = str(Path(str(tmp_path)) / "a"), str(Path(str(tmp_path)) / "b")
    shas = {a: "a" * 64, b: "b" * 64}
    started = _fake_models(monkeypatch, shas)
    reg = Registry(Path(str(tmp_path)) / "registry.sqlite")
    reg.add("m", a, "v1")
    reg.add("m", b, "v2")
    router = deploy.Router(EngineConfig(), "fp32", reg)
    router.sync_registry()
    shas[b] = "c" * 64  # another model copied over b after `kiln registry add`: it was served as v2
    reg.canary("m", "v2", 0.5)
    with pytest.raises(ModelFormatError, match=r"registry's 'm' version 'v2' at .*b has changed since it was added"):
        router.sync_registry()
    assert started == ["v1"] and router.routes["m"].canary is None


def test_a_broken_version_holds_back_neither_other_names_nor_its_live_version(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    from kiln.engine.engine import EngineConfig
    from kiln.serve import deploy
    from kiln.serve.registry import Registry

    root = Path(str(tmp_path))
    paths = {label: str(root / label) for label in ("a1", "a2", "a3", "b1", "b2")}
    shas = {path: label * 32 for label, path in paths.items()}
    started = _fake_models(monkeypatch, shas)
    reg = Registry(root / "registry.sqlite")
    for label, path in paths.items():
        reg.add(label[0], path, label)
    router = deploy.Router(EngineConfig(), "fp32", reg)
    router.sync_registry()
    assert started == ["a1", "b1"]
    shas[paths["a3"]] = "ff" * 32  # a3's folder replaced since it was added
    reg.promote("a", "a2")
    reg.canary("a", "a3", 0.5)
    reg.promote("b", "b2")
    failed: list[str] = []
    changes = router.sync_registry(lambda version, error: failed.append(version.version))
    # a's broken canary stopped neither a2 going live nor b's promotion (both were left undone, retried every poll)
    assert failed == ["a3"] and changes == ["a: live a2", "b: live b2"]
    assert router.routes["a"].live.version == "a2" and router.routes["a"].canary is None
    router.sync_registry(lambda version, error: failed.append(version.version))
    assert started == ["a1", "b1", "a2", "b2"]  # a2 is not loaded again on the next poll
    # nor is a3 tried, and its error logged, again on every poll: its files are as they were when it failed
    assert failed == ["a3"]
    Path(paths["a3"]).mkdir()
    (Path(paths["a3"]) / "model.safetensors").write_bytes(b"x")  # its files changed: tried again, still not the same
    router.sync_registry(lambda version, error: failed.append(version.version))
    assert failed == ["a3", "a3"]
    shas[paths["a3"]] = "a3" * 32  # the registered files put back
    (Path(paths["a3"]) / "model.safetensors").write_bytes(b"xy")
    assert router.sync_registry(lambda version, error: failed.append(version.version)) == ["a: live a2, canary a3 50%"]
    assert failed == ["a3", "a3"] and started[-1] == "a3"
