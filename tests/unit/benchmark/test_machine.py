"""The machine line printed beside every figure."""

from __future__ import annotations

import pytest
import torch

from kiln.benchmark import machine


def test_the_thread_count_is_the_processs_not_the_calling_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # an engine stepping an ONNX session narrows its thread's torch count to one (the autouse fixture gives
    # it back); the figures were computed by a pool of the process's count, and the machine line must say so
    monkeypatch.setattr(machine, "PROCESS_THREADS", 7)
    torch.set_num_threads(1)
    info = machine.machine_info()
    assert info["threads"] == 7
    assert "2 cores (7 threads)" in machine.describe({**info, "cores": 2})
