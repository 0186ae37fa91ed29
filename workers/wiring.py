"""Connect the domain's hooks to Celery: task dispatch and after-commit webhook wake-ups."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery

from connector.events.notify import on_events_committed
from connector.runtime import Runtime

_last_wake = 0.0
_wake_lock = threading.Lock()


def celery_dispatch(app: Celery) -> Any:
    def dispatch(task: str, args: tuple[Any, ...]) -> None:
        app.send_task(task, args=list(args))

    return dispatch


def wire(rt: Runtime, app: Celery, *, debounce_s: float = 0.1) -> None:
    """Make ``rt.dispatch`` enqueue Celery tasks and wake the webhook dispatcher after commits."""
    rt.dispatch = celery_dispatch(app)

    def wake() -> None:
        global _last_wake
        with _wake_lock:
            now = time.monotonic()
            if now - _last_wake < debounce_s:
                return
            _last_wake = now
        app.send_task("x402c.dispatch_webhooks")

    on_events_committed(wake)
