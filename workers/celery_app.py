"""The Celery application.

Broker: Redis in production (``X402C_BROKER_URL=redis://…``); ``memory://`` with an in-process
worker for the embedded default. Tasks are acknowledged late and re-queued when a worker dies, so
a crash re-runs a task instead of losing it; every task is written to be safe to run twice.
"""

from __future__ import annotations

from celery import Celery

from connector.settings import Settings, get_settings

TASK_MODULES = ["workers.tasks", "workers.webhook_tasks"]


def transport_for(broker_url: str) -> str | None:
    """Our transport's path for a plain Redis or in-memory broker URL; None keeps kombu's."""
    if broker_url.startswith(("redis://", "rediss://")):
        return "workers.redis_transport:Transport"
    if broker_url.startswith("memory://"):
        return "workers.memory_transport:Transport"
    return None


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    backend = settings.result_backend
    if backend is None:
        backend = (
            settings.broker_url if settings.broker_url.startswith("redis") else "cache+memory://"
        )
    app = Celery("x402c", broker=settings.broker_url, backend=backend, include=TASK_MODULES)
    transport = transport_for(settings.broker_url)
    if transport is not None:
        app.conf.broker_transport = transport
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One message reserved per thread: a busy worker never sits on tasks an idle one could
        # run. Raising it saves a broker round trip per task (reserved messages stay
        # unacknowledged, so a dying worker's reservations are redelivered like its running
        # tasks); in the send benchmark the gain was within the noise, with one long stall.
        worker_prefetch_multiplier=settings.worker_prefetch,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 10),
        # Every outcome is stored where it belongs (job rows, payments, deliveries); nothing
        # reads Celery results, so storing them would only cost a Redis write per task.
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        enable_utc=True,
        timezone="UTC",
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_timeout_s,
        # One quick retry of a failed publish (a dropped pooled connection), not kombu's three:
        # with a broker that is really down, the caller's job row is already committed and the
        # stale-job sweep sends it later, so waiting longer here only holds the request.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        broker_transport_options=(
            {"polling_interval": 0.005}
            if settings.broker_url.startswith("memory")
            else {
                # Without these, a broker that accepts connections and never answers blocks a
                # publish (and its request or committing thread) for ever. Reads by a worker's
                # consumer wait at most 1 s for a message (BRPOP), well inside the timeout.
                "socket_timeout": settings.broker_timeout_s,
                "socket_connect_timeout": settings.broker_timeout_s,
                "visibility_timeout": settings.broker_visibility_timeout_s,
                "unacked_restore_interval": settings.broker_restore_interval_s,
                "unacked_restore_throttle": 1,
            }
        ),
    )
    return app


celery_app = make_celery()
