"""Failed-authentication rate limit: per client address and per presented key prefix.

Keys carry 256 bits of entropy, so guessing one is hopeless; the limit exists so a client cannot
make the API do unbounded work (a database lookup per attempt) or fill the logs with failures,
and so a leaked prefix cannot be hammered from many addresses. After ``limit`` failures within
``window_s`` seconds under one address or one prefix, authentication is refused (429 with
``Retry-After``) before any lookup, until the oldest failure leaves the window.

State is in process memory: exact for one API process. With several API processes each keeps
its own count, so a client may reach ``limit`` failures per process (see docs/security.md).
Memory is bounded: at most ``max_entries`` addresses/prefixes are tracked, oldest dropped first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable


class FailureLimiter:
    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._max = max_entries
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        stamps = self._failures.get(key)
        if stamps is None:
            return None
        while stamps and stamps[0] <= now - self.window_s:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return None
        return stamps

    def retry_after(self, keys: Iterable[str]) -> int | None:
        """Seconds until every key may try again, or None when none is over the limit."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                stamps = self._recent(key, now)
                if stamps is not None and len(stamps) >= self.limit:
                    wait = max(wait, stamps[-self.limit] + self.window_s - now)
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, keys: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                stamps = self._recent(key, now)
                if stamps is None:
                    stamps = self._failures[key] = deque(maxlen=self.limit)
                else:
                    self._failures.move_to_end(key)
                stamps.append(now)
            while len(self._failures) > self._max:
                self._failures.popitem(last=False)
