"""The server's configuration and shared state: router, limits, metrics, guardrails, request log."""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.engine.engine import EngineConfig, StepOutput
from kiln.errors import InvalidParameterError
from kiln.serve.deploy import Router
from kiln.serve.limits import Admission, RateLimiter
from kiln.serve.metrics import Metrics
from kiln.types import Precision

if TYPE_CHECKING:
    from kiln.serve.feedback import FeedbackStore
    from kiln.serve.guardrails import GuardrailConfig
    from kiln.serve.routes import Job


@dataclass(frozen=True)
class ServeConfig:
    """Everything `kiln serve` takes; each field is one flag."""

    models: tuple[str, ...] = ("default",)  # served under these names (ignored with registry)
    registry: bool = False  # serve the registry's live versions (and canaries), following changes
    registry_poll_s: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: Path | None = None  # sha256 digests of the accepted keys; none = no auth
    requests_per_min: float | None = None  # per key
    tokens_per_min: float | None = None  # per key: prompt + max_tokens, refunded down to what was used
    max_queue: int = 256  # requests admitted (queued or running) at once; more get 429
    request_timeout_s: float | None = 600.0
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 30.0
    log_requests: bool = False  # keep requests and responses (redacted) for feedback
    guardrails: tuple[str, ...] = ()  # TOML filter files: FILE for every model, NAME=FILE for one
    precision: Precision = "fp32"
    kv_budget_bytes: int = 1 << 30  # per model version
    max_running: int = 64
    max_batch_tokens: int = 256
    kv_cache: str = "model"  # model | int8
    runtime: str = "auto"  # auto | torch | torch-compiled | onnxruntime
    draft: str | None = None  # speculative decoding with this draft model while one sequence decodes alone
    speculate: int = 4  # tokens the draft proposes per step

    def __post_init__(self) -> None:
        if self.speculate < 1:
            raise InvalidParameterError(f"--speculate {self.speculate} must be at least 1")
        for flag, count in (("--max-running", self.max_running), ("--max-batch-tokens", self.max_batch_tokens)):
            if count < 1:  # refused by the scheduler too, but naming its fields, not these flags
                raise InvalidParameterError(f"{flag} {count} must be at least 1")
        if self.max_queue < 1 or self.max_body_bytes < 1:
            raise InvalidParameterError("--max-queue and --max-body-bytes must be positive")
        # argparse's float() takes "nan" and "inf": a NaN limit compared False everywhere (no limit at all), 0 divided
        # by zero on the first refusal (500), and a NaN or infinite drain timeout broke uvicorn's start-up
        _check_seconds("--drain-timeout", self.drain_timeout_s, "0 or more")
        if self.request_timeout_s is not None:  # the CLI's 0 ("none") arrives as None
            _check_seconds("--request-timeout", self.request_timeout_s, "more than 0 (0: none)")
        for flag, per_min in (("--rate-limit-requests", self.requests_per_min),
                              ("--rate-limit-tokens", self.tokens_per_min)):
            if per_min is not None and not (math.isfinite(per_min) and per_min > 0):
                raise InvalidParameterError(f"{flag} {per_min} must be a positive number per minute; leave the flag "
                                            "out for no limit")

    def engine(self) -> EngineConfig:
        return EngineConfig(kv_budget_bytes=self.kv_budget_bytes, max_running=self.max_running,
                            max_batch_tokens=self.max_batch_tokens, kv_cache=self.kv_cache)


def _check_seconds(flag: str, value: float, bound: str) -> None:
    """A time flag must be a finite number of seconds: `bound` says whether 0 is one ("0 or more") or not."""
    if not math.isfinite(value) or value < 0 or (value == 0 and bound != "0 or more"):
        raise InvalidParameterError(f"{flag} {value} must be a finite number of seconds, {bound}")


@dataclass
class ServerState:
    config: ServeConfig
    router: Router
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission = field(init=False)
    limiter: RateLimiter = field(init=False)
    guardrails: dict[str, GuardrailConfig] = field(default_factory=dict)  # model name (or "*") -> filters
    feedback: FeedbackStore | None = None
    ready: bool = False
    draining: bool = False
    load_error: BaseException | None = None  # why the start-up load failed: the server stops and serve() raises it
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_queue)
        self.limiter = RateLimiter(self.config.requests_per_min, self.config.tokens_per_min)

    def guardrails_for(self, model: str) -> GuardrailConfig | None:
        return self.guardrails.get(model) or self.guardrails.get("*")

    def log_response(self, job: Job, texts: list[str], outs: list[StepOutput]) -> None:
        """Keep the request (as sent) and its answer's texts in the request log, when there is one."""
        if self.feedback is None:
            return
        request = job.body.model_dump() if job.body is not None else {}
        try:
            self.feedback.log_request(
                job.request_id, job.deployment.name, job.deployment.version, request, "\n".join(texts),
                job.num_prompt_tokens, sum(len(o.request.output) for o in outs),
            )
        except (sqlite3.Error, OSError) as exc:
            # the answer is made and the client's: a log that cannot be written (a full disk, a file made read-only)
            # is the operator's to fix, not a reason to answer 500 or break a finished stream
            logging.getLogger("kiln.serve").error("request log: could not keep %s (%s); check %s", job.request_id,
                                                  exc, self.feedback.path)
