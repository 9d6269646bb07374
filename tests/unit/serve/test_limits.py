"""The per-key token buckets behind --rate-limit-requests and --rate-limit-tokens."""

from __future__ import annotations

import math
import re

import pytest

from kiln.errors import InvalidParameterError
from kiln.serve.limits import RateLimiter
from kiln.serve.state import ServeConfig


def test_a_new_key_can_take_its_whole_bucket_at_once() -> None:
    # take() read the clock before it made the key's bucket: the negative interval drained it a little, so a
    # first request of exactly the limit was refused with "retry in 0.0 s"
    limiter = RateLimiter(requests_per_min=1, tokens_per_min=60)
    assert limiter.take("k", requests=1, tokens=60) is None
    assert limiter.take("k", tokens=1) is not None  # and then it is empty


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("requests_per_min", 0.0, "--rate-limit-requests"),  # divided by zero on the first refusal: a 500
    ("tokens_per_min", -60.0, "--rate-limit-tokens"),  # refused every request, "retry in -0.0 s"
    ("requests_per_min", math.nan, "--rate-limit-requests"),  # compared False everywhere: no limit at all
    ("tokens_per_min", math.inf, "--rate-limit-tokens"),
    ("drain_timeout_s", math.nan, "--drain-timeout"),  # math.ceil(nan) broke uvicorn's start-up
    ("drain_timeout_s", math.inf, "--drain-timeout"),
    ("request_timeout_s", math.nan, "--request-timeout"),
])
def test_serve_refuses_a_limit_that_is_not_a_positive_finite_number(field: str, value: float, flag: str) -> None:
    with pytest.raises(InvalidParameterError, match=re.escape(flag)):
        ServeConfig(**{field: value})  # type: ignore[arg-type]


def test_serve_takes_positive_limits_and_a_zero_drain_timeout() -> None:
    config = ServeConfig(requests_per_min=2, tokens_per_min=100, drain_timeout_s=0)
    assert RateLimiter(config.requests_per_min, config.tokens_per_min).take("k", requests=1) is None


def test_a_request_rate_under_one_a_minute_still_lets_requests_through() -> None:
    # the bucket held 0.5 of a request, so no request ever fitted: each was told to retry in 0.0 s
    limiter = RateLimiter(requests_per_min=0.5, tokens_per_min=None)
    assert limiter.take("k", requests=1) is None
    wait = limiter.take("k", requests=1)
    assert wait is not None and 119 < wait <= 120  # the next one in two minutes
