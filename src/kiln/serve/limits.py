"""Limits that protect the server: request body size, per-key rate limits, and a bounded queue.

The body limit reads at most limit + 1 bytes, whether the size is declared (Content-Length) or not
(chunked), then replays the body to the app. Rate limits are token buckets per API key (or client
address) on requests and tokens per minute. The queue bound is checked before any tokenization.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.protocol import error_body


async def _reply(send: Send, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(error_body(message, type_, code=code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(send, 400, f"bad Content-Length {declared!r}; send a non-negative integer",
                             "invalid_request_error", "bad_content_length")
                return
            if int(declared) > self.max_bytes:
                await _reply(send, 413, f"request body of {int(declared):,} bytes is over the {self.max_bytes:,}-byte "
                             "limit; send less", "invalid_request_error", "body_too_large")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(send, 413, f"request body is over the {self.max_bytes:,}-byte limit; send less",
                             "invalid_request_error", "body_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the real receive would

        await self.app(scope, replay, send)


@dataclass
class Bucket:
    rate_per_s: float
    capacity: float
    level: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        # max(0, ...): take() reads the clock before it makes a key's first bucket, and that negative interval
        # drained a fresh bucket, so a first request of exactly the whole limit waited "0.0 s" and was refused
        self.level = min(self.capacity, self.level + max(0.0, now - self.updated) * self.rate_per_s)
        self.updated = max(self.updated, now)


class RateLimiter:
    """Per-key buckets of requests and tokens per minute; take() says how long to wait when empty."""

    def __init__(self, requests_per_min: float | None, tokens_per_min: float | None) -> None:
        self.rpm, self.tpm = requests_per_min, tokens_per_min
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.lock = threading.Lock()

    def _bucket(self, key: str, kind: str, per_min: float) -> Bucket:
        bucket = self.buckets.get((key, kind))
        if bucket is None:
            # a request bucket holds at least one request: with --rate-limit-requests 0.5 ("one every two minutes")
            # a bucket of half a request could never give a whole one, and every request was refused forever
            capacity = max(per_min, 1.0) if kind == "requests" else per_min
            bucket = self.buckets[(key, kind)] = Bucket(per_min / 60, capacity, capacity)
        return bucket

    def never_fits(self, tokens: float) -> bool:
        """Whether `tokens` is more than a key's whole token bucket (its per-minute limit): take() can never give
        that much, however long the key waits."""
        return self.tpm is not None and tokens > self.tpm

    def take(self, key: str, requests: float = 0, tokens: float = 0) -> float | None:
        """Take from the buckets, or return the seconds until they could give that much (taking nothing). An
        amount over a whole bucket never fits: ask never_fits() first."""
        now = time.monotonic()
        wanted = [(kind, per_min, amount) for kind, per_min, amount in (("requests", self.rpm, requests),
                                                                        ("tokens", self.tpm, tokens))
                  if per_min is not None and amount > 0]
        with self.lock:
            waits = []
            for kind, per_min, amount in wanted:
                bucket = self._bucket(key, kind, per_min)
                bucket.refill(now)
                if bucket.level < amount:
                    waits.append((min(amount, bucket.capacity) - bucket.level) / bucket.rate_per_s)
            if waits:
                return max(waits)
            for kind, per_min, amount in wanted:
                self._bucket(key, kind, per_min).level -= amount
            return None

    def refund(self, key: str, tokens: float) -> None:
        if self.tpm is None or tokens <= 0:
            return
        with self.lock:
            bucket = self._bucket(key, "tokens", self.tpm)
            bucket.level = min(bucket.capacity, bucket.level + tokens)


class Admission:
    """At most `limit` requests admitted (queued or running) at once; checked before tokenization."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0
        self.lock = threading.Lock()

    def try_enter(self) -> bool:
        with self.lock:
            if self.current >= self.limit:
                return False
            self.current += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.current -= 1
