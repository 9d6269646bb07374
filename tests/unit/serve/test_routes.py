"""The generation endpoints in process (a TestClient, no subprocess): how they refuse requests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kiln.serve.app import create_app
from kiln.serve.state import ServeConfig


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
@pytest.mark.parametrize("stream", [{}, {"stream": False}])
def test_stream_options_without_a_stream_are_400(path: str, body: dict, stream: dict) -> None:
    # refused at the schema, before any model is needed: no lifespan, so nothing is loaded
    client = TestClient(create_app(ServeConfig()))
    r = client.post(path, json={**body, **stream, "stream_options": {"include_usage": True}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "stream_options", error
    assert "only allowed when stream is true; drop stream_options or set stream" in error["message"]
