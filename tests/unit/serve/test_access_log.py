"""The access log's request id: echoed in X-Request-Id exactly as the client sent it, or replaced whole."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from starlette.types import Message, Receive, Scope, Send

from kiln.serve.app import AccessLogMiddleware

LIMIT = 128  # the longest request id echoed



async def _empty_200(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def echoed_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The X-Request-Id of the response to a GET with `headers`, as raw bytes (a test client would decode them)."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": headers}
    asyncio.run(AccessLogMiddleware(_empty_200)(scope, receive, send))
    return dict(sent[0]["headers"])[b"x-request-id"]


@pytest.mark.parametrize("sent", [b"abc-123", b"a b/c:d=e", b"x" * LIMIT])
def test_a_printable_ascii_request_id_is_echoed_exactly(sent: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="kiln.access"):
        assert echoed_id([(b"X-Request-Id", sent)]) == sent
    line = json.loads(caplog.records[-1].getMessage())
    assert line["request_id"] == sent.decode() and "refused_request_id" not in line


@pytest.mark.parametrize("sent,logged", [
    ("réq-1".encode(), "réq-1"),  # echoed as "rÃ©q-1": its UTF-8 bytes read as Latin-1, then encoded again
    ("日本".encode(), "日本"),
    (b"a\xffb", "a\\xffb"),
    (b"a\x01b", "a\x01b"),
    (b"x" * (LIMIT + 1), "x" * LIMIT),  # cut to the limit, so it matched nothing the client logged
])
def test_a_request_id_that_cannot_be_echoed_is_replaced_and_logged(sent: bytes, logged: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="kiln.access"):
        echoed = echoed_id([(b"x-request-id", sent)])
    assert re.fullmatch(rb"[0-9a-f]{32}", echoed), echoed
    line = json.loads(caplog.records[-1].getMessage())
    assert line["request_id"] == echoed.decode() and line["refused_request_id"] == logged


def test_no_request_id_gets_a_generated_one() -> None:
    assert re.fullmatch(rb"[0-9a-f]{32}", echoed_id([]))
