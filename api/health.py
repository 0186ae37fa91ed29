"""``/healthz``: which dependency is down, answered in milliseconds even while one hangs.

Why not a plain ``SELECT 1`` in the route: during a database or broker outage a probe can block
for its whole connect timeout, and a health check that hangs is reported by load balancers as a
dead API. Here every probe runs in a small dedicated thread pool (never the event loop, never the
request thread pool that an outage may have filled), with short timeouts of its own; a result is
reused for ``cache_s`` seconds; the route waits at most ``answer_within_s`` for fresh results and
otherwise reports the last known one. A probe still running after ``timeout_s`` counts as down.

Extending: ``app.state.health.add(name, probe, critical=..., cache_s=...)``. A probe returns a
dict of extra fields to show (or None; ``status`` in it overrides ``ok``) and raises when its
dependency is unusable. Critical checks failing
make the answer 503 (``down``); others make it 200 ``degraded``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connector.logs import get_logger

log = get_logger("api.health")
Probe = Callable[[], "dict[str, Any] | None"]


@dataclass
class _Check:
    probe: Probe
    critical: bool
    cache_s: float | None = None  # None: the probes' default
    result: dict[str, Any] | None = None
    finished_at: float = 0.0  # monotonic
    running: Future[dict[str, Any]] | None = None
    started_at: float = 0.0


class HealthProbes:
    def __init__(
        self, *, timeout_s: float = 0.5, cache_s: float = 2.0, answer_within_s: float = 0.05
    ) -> None:
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.answer_within_s = answer_within_s
        self._checks: dict[str, _Check] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="healthz")

    def add(
        self, name: str, probe: Probe, *, critical: bool = True, cache_s: float | None = None
    ) -> None:
        with self._lock:
            self._checks[name] = _Check(probe, critical, cache_s)

    def _run(self, name: str, check: _Check) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            extra = check.probe() or {}
            result: dict[str, Any] = {"status": "ok", **extra}
        except Exception as exc:  # the exception text may hold a DSN: only its type is shown
            result = {"status": "down", "detail": f"unreachable ({type(exc).__name__})"}
            log.warning("health check failed", extra={"check": name, "error": type(exc).__name__})
        result["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
        result["checked_at"] = datetime.now(UTC).isoformat()
        with self._lock:
            check.result = result
            check.finished_at = time.monotonic()
            check.running = None
        return result

    def _refresh(self) -> list[Future[dict[str, Any]]]:
        now = time.monotonic()
        started = []
        with self._lock:
            for name, check in self._checks.items():
                cache_s = self.cache_s if check.cache_s is None else check.cache_s
                fresh = check.result is not None and now - check.finished_at < cache_s
                if fresh or check.running is not None:
                    continue
                check.started_at = now
                check.running = self._pool.submit(self._run, name, check)
                started.append(check.running)
        return started

    def _view(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for name, check in self._checks.items():
                if check.running is not None and now - check.started_at > self.timeout_s:
                    view = {"status": "down", "detail": f"no answer within {self.timeout_s} s"}
                elif check.result is not None:
                    view = dict(check.result)
                else:
                    view = {"status": "unknown", "detail": "first check still running"}
                view["critical"] = check.critical
                out[name] = view
        return out

    async def report(self) -> tuple[int, dict[str, Any]]:
        pending = self._refresh()
        if pending:
            await asyncio.wait(
                [asyncio.wrap_future(f) for f in pending], timeout=self.answer_within_s
            )
        checks = self._view()
        critical_down = any(c["critical"] and c["status"] != "ok" for c in checks.values())
        any_bad = any(c["status"] != "ok" for c in checks.values())
        status = "down" if critical_down else "degraded" if any_bad else "ok"
        return (503 if critical_down else 200), {"status": status, "checks": checks}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def database_probe(engine: Any) -> Probe:
    from sqlalchemy import text

    def probe() -> dict[str, Any] | None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None

    return probe


def beat_probe(engine: Any) -> Probe:
    """Down when no periodic task has run lately (beat or every worker is stopped): nothing then
    reconciles unknown outcomes, requeues lost jobs or expires holds."""
    from connector.beat import beat_status

    def probe() -> dict[str, Any] | None:
        status = beat_status(engine)
        out = {"last_tick_at": status["last_tick_at"], "age_s": status["age_s"]}
        if not status["ok"]:
            age = status["age_s"]
            out["status"] = "down"
            out["detail"] = "no periodic task has run" if age is None else f"last tick {age} s ago"
        return out

    return probe


def broker_probe(broker_url: str, timeout_s: float) -> Probe:
    """A Redis PING with short socket timeouts; the in-memory broker is always up."""
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):

        def in_process() -> dict[str, Any] | None:
            return {"detail": "in-process broker"}

        return in_process

    def probe() -> dict[str, Any] | None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            broker_url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one attempt: the default retries with backoff
        )
        try:
            client.ping()
        finally:
            client.close()
        return None

    return probe
