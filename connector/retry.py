"""Bounded retries with exponential backoff and full jitter, shared by every outbound client.

Full jitter (a random delay in ``[0, min(cap, base * 2**attempt)]``) spreads a thundering herd of
workers that all failed at the same moment; the cap keeps a retry loop inside task time limits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_delay(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    """Delay before retry number ``attempt`` (0-based), with full jitter."""
    return random.uniform(0, min(cap, base * (2**attempt)))


def call_with_retries(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    attempts: int = 3,
    base: float = 0.2,
    cap: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn``; on one of ``retry_on`` try again up to ``attempts`` times in all."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(attempts):
        try:
            return fn()
        except retry_on:
            if attempt == attempts - 1:
                raise
            sleep(backoff_delay(attempt, base, cap))
    raise AssertionError("unreachable")
