"""Start the real `kiln serve` as a subprocess on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

KILN = str(Path(sys.executable).parent / "kiln")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)  # type: ignore[arg-type]

    def post(self, path: str, json: object, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, json=json, timeout=120, **kw)  # type: ignore[arg-type]

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """Sum of a Prometheus metric's samples (all labels)."""
        text = self.get("/metrics", headers=headers or {}).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def kiln_server(*args: str, env: dict[str, str] | None = None, tmp: Path, wait_ready: bool = True,
                timeout_s: float = 300) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([KILN, "serve", "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while wait_ready:
            if proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kiln serve not ready after {timeout_s} s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")
