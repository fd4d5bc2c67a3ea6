"""Token buckets and the concurrency cap, on a controlled clock."""

from __future__ import annotations

import pytest

from services.gateway.security.ratelimit import ConcurrencyCap, RateLimiter
from services.gateway.status import retry_after_header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refusal_with_the_wait_until_the_next_token() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.take("key:a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("key:a") == pytest.approx(0.5)  # one token per 0.5 s
    clock.now += 0.25
    assert limiter.take("key:a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("key:a") == 0.0
    assert limiter.take("key:b") == 0.0, "each principal has its own bucket"


def test_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=10.0, burst=2, clock=clock)
    limiter.take("k")
    clock.now += 3600
    assert [limiter.take("k") == 0.0 for _ in range(3)] == [True, True, False]


def test_per_key_override_and_off() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=clock)
    assert limiter.take("k", rate_per_s=100.0, burst=5) == 0.0
    assert sum(limiter.take("k", rate_per_s=100.0, burst=5) == 0.0 for _ in range(10)) == 4
    off = RateLimiter(rate_per_s=0.0, burst=1, clock=clock)
    assert all(off.take("k") == 0.0 for _ in range(1000))
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=1.0, burst=0.5)


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.2) == "2"


def test_concurrency_cap_refuses_without_blocking_and_frees_on_leave() -> None:
    cap = ConcurrencyCap(2)
    assert cap.try_enter() and cap.try_enter()
    assert not cap.try_enter()
    assert cap.active == 2
    cap.leave()
    assert cap.try_enter()
    unlimited = ConcurrencyCap(0)
    assert all(unlimited.try_enter() for _ in range(100))
