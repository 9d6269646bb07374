"""Closed-loop load on an OpenAI-compatible endpoint: streamed requests timed per token, and their summary.

Each request is timed from the client: TTFT (sent to first text chunk), TPOT ((last - first text chunk) /
(tokens - 1)) and end to end; output tokens come from the final usage chunk (stream_options.include_usage),
else from the number of text chunks. Starting servers and measuring their memory is left to bench/serve_load.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx

PROMPT_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class LoadError(RuntimeError):
    """The server did not answer the warm-up request; the message quotes what came back."""


@dataclass(frozen=True)
class LoadSpec:
    """What every request of a run carries."""

    base_url: str  # http://host:port, no trailing slash
    endpoint: Literal["completions", "chat"]
    model: str  # the `model` field sent (the server's first /v1/models id when it lists one)
    max_tokens: int
    timeout_s: float  # whole request, connect to last byte
    has_usage: bool = True  # send stream_options.include_usage; dropped if the server rejects it


@dataclass
class Sample:
    """One request as the client saw it; times from time.perf_counter(), durations in seconds."""

    start_s: float
    end_s: float = 0.0
    num_tokens: int = 0
    ttft_s: float | None = None  # None when no text arrived
    tpot_s: float | None = None  # None below 2 tokens
    is_usage_counted: bool = False  # num_tokens from the usage chunk rather than counted text chunks
    error: str | None = None


def request_body(spec: LoadSpec, instruction: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens, "temperature": 0.0, "stream": True}
    if spec.has_usage:
        body["stream_options"] = {"include_usage": True}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": instruction}]
    else:
        body["prompt"] = PROMPT_TEMPLATE.format(instruction=instruction)
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The new text in one SSE chunk of either endpoint ('' for role, finish and usage chunks)."""
    choices = chunk.get("choices") or [{}]
    if "text" in choices[0]:
        return choices[0]["text"] or ""
    return (choices[0].get("delta") or {}).get("content") or ""


async def read_stream(response: httpx.Response, sample: Sample) -> None:
    """Consume the SSE stream into sample: token times, token count, and an error if it never says [DONE]."""
    token_times: list[float] = []
    usage_tokens, is_done = None, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            is_done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            sample.error = f"error event: {str(chunk['error'])[:200]}"
        if chunk_text(chunk):
            token_times.append(time.perf_counter())
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
    sample.is_usage_counted = usage_tokens is not None
    sample.num_tokens = usage_tokens if usage_tokens is not None else len(token_times)
    if token_times:
        sample.ttft_s = token_times[0] - sample.start_s
    if token_times and sample.num_tokens > 1:
        sample.tpot_s = (token_times[-1] - token_times[0]) / (sample.num_tokens - 1)
    if not is_done and sample.error is None:
        sample.error = "stream ended without data: [DONE]"


async def send(client: httpx.AsyncClient, spec: LoadSpec, instruction: str) -> Sample:
    """One streaming request; never raises for server trouble, which goes into Sample.error."""
    sample = Sample(start_s=time.perf_counter())
    try:
        async with asyncio.timeout(spec.timeout_s), client.stream(
            "POST", spec.base_url + ENDPOINTS[spec.endpoint], json=request_body(spec, instruction)
        ) as response:
            if response.status_code // 100 != 2:
                body = (await response.aread()).decode("utf-8", errors="replace")
                sample.error = f"HTTP {response.status_code}: {body[:200]}"
            else:
                await read_stream(response, sample)
    except TimeoutError:
        sample.error = f"timeout after {spec.timeout_s:.0f} s"
    except httpx.HTTPError as error:
        sample.error = f"{type(error).__name__}: {error}"
    except json.JSONDecodeError as error:
        sample.error = f"chunk is not JSON: {error}"
    sample.end_s = time.perf_counter()
    return sample


async def warm_up(client: httpx.AsyncClient, spec: LoadSpec, instruction: str) -> LoadSpec:
    """One request before a level; drops stream_options if the server answers it with a 4xx."""
    sample = await send(client, spec, instruction)
    if sample.error and spec.has_usage and sample.error.startswith("HTTP 4"):
        spec = replace(spec, has_usage=False)
        sample = await send(client, spec, instruction)
    if sample.error:
        raise LoadError(f"warm-up request to {spec.base_url} failed: {sample.error}")
    return spec


# ---- closed loop ----


async def closed_loop(client: httpx.AsyncClient, spec: LoadSpec, prompts: Iterator[str], concurrency: int,
                      num_requests: int | None = None, deadline_s: float = math.inf) -> list[Sample]:
    """`concurrency` workers send back to back until num_requests were sent or deadline_s (perf_counter) passed."""
    samples: list[Sample] = []
    num_left = num_requests if num_requests is not None else math.inf

    async def worker() -> None:
        nonlocal num_left
        while num_left > 0 and time.perf_counter() < deadline_s:
            num_left -= 1
            samples.append(await send(client, spec, next(prompts)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def sample_stats(samples: list[Sample], wall_s: float) -> dict[str, float]:
    """Rates over wall_s and latency percentiles (ms, s) of the requests without an error."""
    ok = [s for s in samples if s.error is None]
    ttft = [1e3 * s.ttft_s for s in ok if s.ttft_s is not None]
    tpot = [1e3 * s.tpot_s for s in ok if s.tpot_s is not None]
    e2e = [s.end_s - s.start_s for s in ok]
    num_tokens = sum(s.num_tokens for s in ok)
    return {
        "num_requests": len(samples), "num_errors": len(samples) - len(ok),
        "requests_per_s": len(ok) / wall_s, "output_tokens_per_s": num_tokens / wall_s,
        "mean_output_tokens": num_tokens / len(ok) if ok else math.nan,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
        "usage_counted_fraction": sum(s.is_usage_counted for s in ok) / len(ok) if ok else math.nan,
    }
