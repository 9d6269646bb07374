"""JSON requests to an OpenAI-compatible server for `kiln eval --api`: a few in flight at once, 429 and 503
retried after the server's Retry-After, and every failure one line naming the URL, the status and the fix.

httpx does the HTTP. The retry loop is written here because its wait comes from the answer's Retry-After
header (kiln serve sends one with every 429 and 503), which a retry library would leave to a callback anyway.
What the requests carry and what the answers mean is served.py's.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from kiln.errors import EndpointError, InvalidParameterError

RETRY_STATUSES = frozenset({429, 503})  # kiln serve: queue full, rate limit, still loading, draining
MAX_WAIT_S = 60.0  # a longer Retry-After is cut to this: the run should fail visibly rather than hang
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ApiConfig:
    """Which server, which of its models, and how hard to push it."""

    url: str  # the server's base URL (http://127.0.0.1:8000); a trailing /v1 is accepted
    api_key: str | None = None  # sent as Authorization: Bearer KEY
    model: str | None = None  # the served model's name; None: the only one the server lists
    concurrency: int = 4  # requests in flight at once: enough to overlap the HTTP with the server's work
    prompts_per_request: int = 16  # the completions API takes a list of prompts (kiln serve: up to 64)
    max_retries: int = 8  # 429 / 503 answers retried, after Retry-After or a doubling backoff
    backoff_s: float = 0.5  # the first wait when the server names none; doubled per retry, at most MAX_WAIT_S
    timeout_s: float = 600.0  # per request (--api-timeout): a batch of echo passes on a busy CPU server takes a while

    def __post_init__(self) -> None:
        try:
            url = httpx.URL(self.url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidParameterError(
                f"--api {self.url!r} is not an http(s) URL; pass the server's base URL, e.g. http://127.0.0.1:8000")
        for name in ("concurrency", "prompts_per_request"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} {getattr(self, name)} must be at least 1")
        if self.max_retries < 0 or self.backoff_s < 0:
            raise InvalidParameterError("max_retries and backoff_s must be 0 or more")
        if not self.timeout_s > 0:  # NaN too
            raise InvalidParameterError(f"--api-timeout {self.timeout_s:g} must be more than 0 seconds")

    @property
    def base_url(self) -> str:
        """The URL without a trailing slash or /v1: request paths start with /v1 themselves."""
        url = self.url.rstrip("/")
        return url.removesuffix("/v1")


class ApiClient:
    """Requests to one server on an event loop of the client's own, so that its callers stay synchronous.

    Ctrl-C cancels the requests in flight (asyncio.Runner turns SIGINT into a cancellation) and reaches the
    caller as KeyboardInterrupt, as it does during an in-process evaluation.
    """

    def __init__(self, config: ApiConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._runner = asyncio.Runner()
        self._http = httpx.AsyncClient(
            base_url=config.base_url, headers=headers, transport=transport,
            timeout=httpx.Timeout(config.timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=config.concurrency),
        )

    def close(self) -> None:
        self._runner.run(self._http.aclose())
        self._runner.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def get(self, path: str, missing_ok: bool = False) -> Any:
        """The JSON answer of GET path; None for a 404 when missing_ok."""
        return self._runner.run(self._request("GET", path, None, missing_ok))

    def post_many(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        """The JSON answers of POSTing each body, in order, at most `concurrency` at once; the first failure
        cancels the rest and is raised."""
        return list(self._runner.run(self._post_all(path, bodies)))

    async def _post_all(self, path: str, bodies: Sequence[dict[str, Any]]) -> list[Any]:
        gate = asyncio.Semaphore(self.config.concurrency)

        async def one(body: dict[str, Any]) -> Any:
            async with gate:
                return await self._request("POST", path, body)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(body)) for body in bodies]
        except BaseExceptionGroup as failed:  # one line for the user, not a group of tracebacks
            first = next((e for e in failed.exceptions if isinstance(e, EndpointError)), None)
            if first is None:
                raise
            raise first from None
        return [task.result() for task in tasks]

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, missing_ok: bool = False) -> Any:
        url = self.config.base_url + path
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise EndpointError(f"cannot reach {url} ({exc or type(exc).__name__}); start the server (kiln "
                                    "serve) or fix --api") from None
            except httpx.TimeoutException as exc:
                raise EndpointError(f"{url} did not answer within {self.config.timeout_s:g} s ({type(exc).__name__}); "
                                    "check that the server is up and not stalled, or raise --api-timeout") from None
            except httpx.TransportError as exc:  # the connection broke mid-request
                raise EndpointError(f"the connection to {url} failed ({exc or type(exc).__name__}); check the "
                                    "server and its log") from None
            if (response.status_code in RETRY_STATUSES and attempt < self.config.max_retries
                    and response.headers.get("x-should-retry") != "false"):  # kiln serve: no wait would help
                await asyncio.sleep(retry_wait_s(response, attempt, self.config.backoff_s))
                attempt += 1
                continue
            if response.status_code == 404 and missing_ok:
                return None
            if not response.is_success:
                raise EndpointError(refusal(url, response, attempt))
            try:
                return response.json()
            except ValueError:
                raise EndpointError(f"{url} answered HTTP {response.status_code} with a body that is not JSON; "
                                    "check that --api names an OpenAI-compatible server") from None


def retry_wait_s(response: httpx.Response, attempt: int, backoff_s: float) -> float:
    """Seconds to wait before retrying: the answer's Retry-After (seconds or an HTTP date), else backoff_s doubled
    per attempt; never more than MAX_WAIT_S."""
    value = response.headers.get("retry-after", "").strip()
    wait = backoff_s * 2**attempt
    if value:
        try:
            wait = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
            if when is not None:
                wait = when.timestamp() - time.time()
    return min(max(wait, 0.0), MAX_WAIT_S)


def refusal(url: str, response: httpx.Response, retries: int) -> str:
    """One line for a failed answer: the URL, the status, the server's own message, and what to do."""
    status = response.status_code
    if status in (401, 403):
        fix = "pass the server's key with --api-key KEY or KILN_API_KEY"
    elif status == 404:
        fix = "check that --api is the server's base URL and --api-model a model it serves"
    elif status in RETRY_STATUSES:
        fix = (f"the server is overloaded or not ready (asked {retries + 1} times): try again later, or raise its "
               "--max-queue or rate limits")
    elif status < 500:
        fix = "the server refused kiln's request; check that -m names the model it serves (kiln tokenizes locally)"
    else:
        fix = "the server failed; see its log"
    return f"{url} answered HTTP {status} ({_detail(response)}); {fix}"


def _detail(response: httpx.Response) -> str:
    """The server's message: OpenAI's error envelope, or the start of the body."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    return " ".join(str(message).split())[:200] or response.reason_phrase
