"""The engine thread's failure modes: a failed step, a broken engine, and what the server says then."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.sampler import SamplingParams
from kiln.model.load import load
from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig
from kiln.serve.worker import FAILED_STEPS_LIMIT, EngineStopped, EngineWorker

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def worker(tiny_folder: Path):
    loaded = load(str(tiny_folder), progress=False)
    w = EngineWorker(Engine(loaded.model, loaded.tokenizer, EngineConfig(kv_budget_bytes=4 << 20)))
    w.start()
    yield w
    w.stop()


async def collect(worker: EngineWorker, request_id: str) -> list[int]:
    tokens: list[int] = []
    async for out in worker.stream([1, 5, 9], PARAMS, request_id, deadline=time.monotonic() + 30):
        tokens += out.tokens
    return tokens


def test_one_failed_step_fails_its_requests_and_the_engine_goes_on(worker: EngineWorker,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_step, calls = worker.engine.step, []

    def flaky() -> list:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(worker.engine, "step", flaky)
    with pytest.raises(RuntimeError, match="generation failed"):
        asyncio.run(collect(worker, "a"))
    assert len(asyncio.run(collect(worker, "b"))) == 8
    assert worker.alive and worker.fault is None and worker.stats.errors == 1


def test_a_request_the_engine_cannot_add_fails_alone(worker: EngineWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    real_add = worker.engine.add_request

    def add(prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Any:
        if request_id == "bad":  # as torch's generator once did with a seed over 64 bits
            raise ValueError("Overflow when unpacking long long")
        return real_add(prompt, params, request_id)

    monkeypatch.setattr(worker.engine, "add_request", add)
    with pytest.raises(ValueError, match="Overflow"):
        asyncio.run(collect(worker, "bad"))
    assert len(asyncio.run(collect(worker, "good"))) == 8
    assert worker.alive and worker.fault is None


def test_a_broken_engine_stops_and_refuses_at_once(worker: EngineWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list:
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(worker.engine, "step", broken)
    for i in range(FAILED_STEPS_LIMIT):
        with pytest.raises((RuntimeError, EngineStopped)):
            asyncio.run(collect(worker, f"r{i}"))
    worker.thread.join(5)
    assert not worker.alive and "kernel fault" in (worker.fault or "")
    with pytest.raises(EngineStopped, match="kernel fault"):  # refused before anything is queued
        asyncio.run(collect(worker, "late"))


def test_health_and_requests_turn_503_when_the_engine_dies(tiny_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, ready_client: Any) -> None:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    app = create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=4 << 20))
    with ready_client(app) as client:
        body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4}
        name = client.get("/v1/models").json()["data"][0]["id"]
        assert client.post("/v1/completions", json={**body, "model": name}).status_code == 200
        worker = app.state.kiln.router.deployments()[0].worker

        def broken() -> list:
            raise RuntimeError("kernel fault")

        monkeypatch.setattr(worker.engine, "step", broken)
        codes = [client.post("/v1/completions", json={**body, "model": name}).status_code
                 for _ in range(FAILED_STEPS_LIMIT + 1)]
        assert codes[-1] == 503 and all(c >= 500 for c in codes)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stopped"
        assert client.get("/ready").status_code == 503


def test_the_gauges_read_zero_once_the_last_request_is_done(worker: EngineWorker) -> None:
    assert len(asyncio.run(collect(worker, "only"))) == 8
    for _ in range(50):  # the thread refreshes its stats after the step that finished the request
        if worker.stats.running == 0 and worker.stats.waiting == 0:
            break
        time.sleep(0.1)
    assert (worker.stats.running, worker.stats.waiting, worker.stats.kv_used_fraction) == (0, 0, 0.0)


def test_a_budget_shorter_than_the_context_is_named_at_the_load(tiny_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, ready_client: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # a sequence past the whole cache stops with finish_reason "length", which the response cannot tell apart
    # from max_tokens: nothing said that the budget, not the request, was the limit
    import re

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    loaded = load(str(tiny_folder), progress=False)
    notes = {}
    for budget in (16 << 10, 4 << 20):  # 48 tokens of the tiny model's context of 64; thousands
        caplog.clear()
        with caplog.at_level("WARNING", logger="kiln.serve"), \
                ready_client(create_app(ServeConfig(models=(str(tiny_folder),), kv_budget_bytes=budget))) as client:
            assert client.get("/ready").status_code == 200
        notes[budget] = [r.getMessage() for r in caplog.records if "KV cache budget holds" in r.getMessage()]
    assert not notes[4 << 20] and len(notes[16 << 10]) == 1
    found = re.search(rf"holds (\d+) tokens, fewer than the model's context of {loaded.spec.max_position}: .* "
                      r"--kv-budget-mb (\d+) or more holds a whole context", notes[16 << 10][0])
    assert found is not None, notes[16 << 10][0]
    capacity, mib = int(found[1]), int(found[2])
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(kv_budget_bytes=mib << 20))
    assert capacity < loaded.spec.max_position <= engine.cache.capacity_tokens
