"""The machine and software versions a measurement was taken on, printed beside every figure."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

from kiln import __version__
from kiln.engine.threads import PROCESS_THREADS


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo: memory a new allocation can take now (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(*packages: str) -> dict[str, Any]:
    """CPU, cores, threads, memory, and the versions of kiln, Python, torch and `packages`."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        # the count kiln computes with: a torch model's threads, or an ONNX session's intra-op pool; not this
        # thread's torch count, which stepping an ONNX session narrows to one (engine/threads.py)
        "threads": PROCESS_THREADS,
        "memory_gib": round(memory_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "kiln": __version__,
        "torch": torch.__version__,
        **{name: version_of(name) for name in packages},
    }


def describe(info: dict[str, Any]) -> str:
    """One line for a report: 'AMD EPYC ..., 2 cores (2 threads), 23.4 GiB; Python 3.11.7, ...'."""
    fixed = ("cpu", "cores", "threads", "memory_gib")
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if k not in fixed)
    return (f"{info['cpu']}, {info['cores']} cores ({info['threads']} threads), "
            f"{info['memory_gib']} GiB; {versions}")


def read_bandwidth_gbs(size_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` rate (1e9 B/s) of summing a large fp32 array: the memory roofline for decode."""
    import time

    data = torch.ones(size_bytes // 4)
    data.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9
