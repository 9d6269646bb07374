"""Limits that protect the server: API keys on every route, per-key rate limits, body size, the bounded
queue, per-request timeouts, and the context limit at its exact edge."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Server, kiln_server

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def guarded(module_tmp: Path, tiny_folder: Path) -> Iterator[Server]:
    key_file = module_tmp / "keys.txt"
    key_file.write_text("# digests only\n" + "".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in KEYS))
    with kiln_server("-m", str(tiny_folder), "--api-key-file", str(key_file), "--rate-limit-requests", "5",
                     "--max-body-bytes", "2000", tmp=module_tmp) as server:
        yield server


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_is_guarded(guarded: Server) -> None:
    from kiln.serve.app import create_app
    from kiln.serve.state import ServeConfig

    paths = {r.path for r in create_app(ServeConfig()).routes if hasattr(r, "path")} - {"/health", "/ready"}
    paths |= {"/v1/models/", "/v1/not-a-route", "/docs", "/openapi.json", "/admin"}
    for path in sorted(paths):
        for method in ("GET", "POST", "OPTIONS"):
            for headers in ({}, auth("wrong-key"), {"Authorization": "Basic a2V5LW9uZQ=="},
                            {"Authorization": "bearer"}):
                r = httpx.request(method, guarded.url + path, headers=headers, timeout=30)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.get(guarded.url + "/ready").status_code == 200


def test_right_keys_pass(guarded: Server) -> None:
    for key in KEYS:
        assert httpx.get(guarded.url + "/v1/models", headers=auth(key)).status_code == 200
    assert httpx.get(guarded.url + "/metrics", headers=auth(KEYS[0])).status_code == 200


def test_rate_limit_per_key(guarded: Server) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    codes = [httpx.post(guarded.url + "/v1/completions", json=body, headers=auth(KEYS[1]), timeout=30)
             for _ in range(7)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and int(limited[0].headers["retry-after"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limit_requests"
    other = httpx.post(guarded.url + "/v1/completions", json=body, headers=auth(KEYS[0]), timeout=30)
    assert other.status_code == 200  # another key is unaffected


def test_body_limit_by_length_and_by_chunks(guarded: Server) -> None:
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    r = httpx.post(guarded.url + "/v1/completions", json=big, headers=auth(KEYS[0]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'", "max_tokens": 1}'

    r = httpx.post(guarded.url + "/v1/completions", content=chunks(), headers={**auth(KEYS[0]),
                                                                                "content-type": "application/json"})
    assert r.status_code == 413
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\nAuthorization: Bearer "
                     + KEYS[0].encode() + b"\r\n\r\n")
        assert b" 400 " in sock.recv(4096).split(b"\r\n")[0] + b" "


def test_context_limit_edge(module_tmp: Path, tiny_folder: Path) -> None:
    with kiln_server("-m", str(tiny_folder), tmp=module_tmp) as server:  # a 64-token context
        ok = server.post("/v1/completions", {"prompt": [42] * 60, "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        over = server.post("/v1/completions", {"prompt": [42] * 60, "max_tokens": 5})
        assert over.status_code == 400 and "60 tokens" in over.json()["error"]["message"]
        assert "64" in over.json()["error"]["message"]


@pytest.fixture(scope="module")
def slow(module_tmp: Path) -> Iterator[Server]:
    """The default model with a queue of 2 and an 8-second request timeout."""
    with kiln_server("--max-queue", "2", "--request-timeout", "8", tmp=module_tmp) as server:
        yield server


def test_backpressure_rejects_exactly_the_overflow(slow: Server) -> None:
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        r = httpx.post(slow.url + "/v1/completions", timeout=60,
                       json={"prompt": "Write a long story.", "max_tokens": 24, "temperature": 0,
                             "ignore_eos": True})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 2 and codes.count(429) == 4, codes
    rejected = next(r for r in results if r.status_code == 429)
    assert rejected.headers["retry-after"] and rejected.json()["error"]["code"] == "queue_full"
    assert slow.metric("kiln_rejections_total") >= 4


def test_timeout_frees_the_slot(slow: Server) -> None:
    before = slow.metric("kiln_timeouts_total")
    r = slow.post("/v1/completions", {"prompt": "Count forever:", "max_tokens": 4000, "temperature": 0,
                                      "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert slow.metric("kiln_timeouts_total") == before + 1
    # the engine drops the sequence at its next step; poll rather than guess how long that takes
    deadline = time.monotonic() + 10
    while (slow.metric("kiln_running_sequences"), slow.metric("kiln_queue_depth")) != (0, 0):
        assert time.monotonic() < deadline, "the timed-out request still holds its slot"
        time.sleep(0.1)
    assert slow.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
