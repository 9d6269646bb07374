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
