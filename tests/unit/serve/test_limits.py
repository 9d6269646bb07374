"""The per-key token buckets behind --rate-limit-requests and --rate-limit-tokens."""

from __future__ import annotations

from kiln.serve.limits import RateLimiter


def test_a_new_key_can_take_its_whole_bucket_at_once() -> None:
    # take() read the clock before it made the key's bucket: the negative interval drained it a little, so a
    # first request of exactly the limit was refused with "retry in 0.0 s"
    limiter = RateLimiter(requests_per_min=1, tokens_per_min=60)
    assert limiter.take("k", requests=1, tokens=60) is None
    assert limiter.take("k", tokens=1) is not None  # and then it is empty
