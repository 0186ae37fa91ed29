"""Connect the domain's hooks to Celery: task dispatch and after-commit webhook wake-ups."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger

from connector.events.notify import on_events_committed
from connector.logs import get_logger
from connector.runtime import Runtime

log = get_logger(__name__)

# The tables every action touches; a starting worker has its database connections load them.
HOT_TABLES = ("jobs", "connections", "payments", "events", "reservations", "budget_locks")


def send(app: Celery, task: str, *args: Any, **kwargs: Any) -> None:
    """Enqueue ``task`` by name, telling Celery that nobody waits for its result.

    Our tasks' outcomes live in the database (jobs, payments, deliveries), never in a result
    backend. By name, Celery cannot know the task ignores its result and, with the Redis backend,
    subscribes to the result's channel on every send and unsubscribes later: two extra Redis
    commands and ~0.1 ms of CPU per enqueue, on every job the API queues.
    """
    app.send_task(task, args=list(args), kwargs=kwargs or None, ignore_result=True)


class BrokerUnavailable(ConnectionError):
    """Not sent: the broker failed moments ago and its cool-down has not passed yet."""


class PublishBreaker:
    """Publishes through ``publish`` until it fails; then fails fast for a cool-down.

    Publishing sits on request and commit paths, where the work it announces is already
    committed (a ``queued`` job row, an outbox event) and swept up later if the message is lost.
    So a caller gains nothing by paying the broker's timeouts again and again while it is down:
    after a failure, calls raise :class:`BrokerUnavailable` at once for the cool-down (1 s,
    doubling to 30 s while failures go on); then one caller tries again, and a success closes
    the breaker.
    """

    def __init__(
        self,
        publish: Callable[..., None],
        *,
        first_cool_down_s: float = 1.0,
        max_cool_down_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publish = publish
        self._first = first_cool_down_s
        self._max = max_cool_down_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cool_down = 0.0  # 0: closed
        self._open_until = 0.0
        self._probing = False

    def __call__(self, task: str, args: tuple[Any, ...], **kwargs: Any) -> None:
        with self._lock:
            if self._cool_down:
                if self._probing or self._clock() < self._open_until:
                    raise BrokerUnavailable(f"broker unavailable; {task} not sent")
                self._probing = True  # this caller tries; the others keep failing fast
        try:
            self._publish(task, args, **kwargs)
        except Exception as exc:
            with self._lock:
                self._probing = False
                first = not self._cool_down
                self._cool_down = min(self._max, self._cool_down * 2 or self._first)
                self._open_until = self._clock() + self._cool_down
                cool_down = self._cool_down
            if first:
                log.warning(
                    "broker unreachable: publishing paused",
                    extra={"error": type(exc).__name__, "retry_in_s": cool_down},
                )
            raise
        with self._lock:
            was_open = bool(self._cool_down)
            self._cool_down, self._probing = 0.0, False
        if was_open:
            log.warning("broker reachable again: publishing resumed")


def celery_dispatch(app: Celery) -> PublishBreaker:
    """``rt.dispatch`` for ``app``: enqueue a task by name, behind a :class:`PublishBreaker`."""
    return PublishBreaker(lambda task, args, **kwargs: send(app, task, *args, **kwargs))


class Debounced:
    """Call ``fire`` at most once per ``interval`` seconds, on the leading *and* trailing edge.

    The leading call wakes the dispatcher at once after a quiet period; calls inside the window
    are folded into one trailing call at its end, so the last events of a burst are dispatched
    within ``interval`` instead of waiting for the beat sweep. Under load this turns one wake-up
    per commit into a few per second, and each dispatcher run takes a bigger batch.
    """

    def __init__(self, fire: Callable[[], None], interval: float) -> None:
        self._fire = fire
        self._interval = interval
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._trailing = False

    def __call__(self) -> None:
        with self._lock:
            now = time.monotonic()
            wait = self._last + self._interval - now
            if wait <= 0:
                self._last = now
            elif self._trailing:
                return
            else:
                self._trailing = True
                timer = threading.Timer(wait, self._fire_trailing)
                timer.daemon = True
                timer.start()
                return
        self._fire()

    def _fire_trailing(self) -> None:
        with self._lock:
            self._trailing = False
            self._last = time.monotonic()
        self._fire()


def quiet_task_logs() -> None:
    """Drop Celery's per-task INFO lines ("received", "succeeded"); warnings and errors stay.

    Installed on Celery's ``after_setup_logger`` signal because Celery configures its loggers when
    the worker starts, after our code has run.
    """

    def lower(**_: Any) -> None:
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)

    after_setup_logger.connect(lower, weak=False)


def wire(rt: Runtime, app: Celery, *, debounce_s: float = 0.25) -> None:
    """Make ``rt.dispatch`` enqueue Celery tasks and wake the webhook dispatcher after commits."""
    dispatch = celery_dispatch(app)
    rt.dispatch = dispatch

    def wake_dispatcher() -> None:
        # A lost wake-up costs only latency: beat's sweep delivers the events anyway.
        with contextlib.suppress(BrokerUnavailable):
            dispatch("x402c.dispatch_webhooks", (), new_only=True)

    on_events_committed(Debounced(wake_dispatcher, debounce_s))
