"""The failed-authentication limiter: a sliding window per name, bounded memory."""

from __future__ import annotations

from api.ratelimit import FailureLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_opens_again_when_the_oldest_failure_leaves_the_window() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60, clock=clock)
    for step in range(3):
        assert limiter.retry_after(["addr:a"]) is None
        limiter.failed(["addr:a"])
        clock.now += 10 if step < 2 else 0
    assert limiter.retry_after(["addr:a"]) == 40  # first failure at 1000, now 1020
    assert limiter.retry_after(["addr:b"]) is None
    clock.now = 1060.5
    assert limiter.retry_after(["addr:a"]) is None
    limiter.failed(["addr:a"])
    assert limiter.retry_after(["addr:a"]) == 10  # second failure (1010) leaves at 1070


def test_memory_is_bounded() -> None:
    limiter = FailureLimiter(1, 60, clock=Clock(), max_entries=100)
    for i in range(1000):
        limiter.failed([f"addr:{i}"])
    assert len(limiter._failures) == 100
    assert limiter.retry_after(["addr:999"]) is not None
    assert limiter.retry_after(["addr:0"]) is None  # the oldest was dropped
