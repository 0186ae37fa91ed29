"""The embedded default: a Celery worker in this process on the in-memory broker.

Used by ``x402c dev``/``demo`` and tests that need no Redis: same tasks, same retries, one
process. A real deployment runs ``x402c worker`` processes on Redis instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.contrib.testing.worker import start_worker

from connector.runtime import Runtime
from workers import runtime as worker_runtime
from workers.celery_app import celery_app
from workers.wiring import send, wire


def _periodic(stop: threading.Event) -> None:
    """The embedded stand-in for ``x402c beat``: the same schedule, sent to the same worker."""
    schedule = dict(celery_app.conf.beat_schedule or {})
    last: dict[str, float] = {}
    while not stop.wait(1.0):
        now = time.monotonic()
        for name, entry in schedule.items():
            if now - last.get(name, now - float(entry["schedule"]) - 1) >= float(entry["schedule"]):
                last[name] = now
                send(celery_app, entry["task"])


@contextmanager
def embedded_worker(rt: Runtime, concurrency: int = 4) -> Iterator[None]:
    import workers.tasks
    import workers.webhook_tasks  # noqa: F401

    worker_runtime.install(rt)
    wire(rt, celery_app)
    pools: list[Any] = []
    try:
        with start_worker(
            celery_app,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=10.0,
            hostname="embedded@x402c",
        ) as worker:
            pools.append(worker.pool)
            stop = threading.Event()
            beat = threading.Thread(
                target=_periodic, args=(stop,), name="embedded-beat", daemon=True
            )
            beat.start()
            try:
                yield
            finally:
                stop.set()
                beat.join(timeout=5)
    finally:
        # Celery's test worker stops cold: its thread pool is left without waiting, so a task
        # still running (a reconcile pass, a send) would go on using the runtime after our
        # caller closed it. Wait for those tasks; queued ones that never started are dropped.
        for pool in pools:
            executor = getattr(pool, "executor", None)
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
