"""Celery tasks: thin wrappers that load by id and call one connector service.

Arguments are ids only — never secrets, never payloads. Every task is safe to run twice (late
acks mean a crashed worker's task runs again): the services decide from the stored state what is
left to do.
"""

from __future__ import annotations

from celery import Task

# Imported when the worker starts, not inside the first task: the payment stack (eth-account,
# SQLAlchemy models, pydantic schemas) takes over a second to import, which would otherwise land
# on the first payment every worker runs.
from connector.actions.service import run as run_action
from connector.beat import record_tick
from connector.errors import ConcurrentUpdate, ExternalServiceError
from connector.jobs import Handover, purge_expired
from connector.logs import get_logger
from connector.payments import maintenance
from connector.payments.driver import drive
from connector.retry import backoff_delay
from connector.storage.db import CONNECTION_ERRORS, transaction
from workers.celery_app import celery_app
from workers.runtime import runtime

RETRYABLE = (ExternalServiceError, ConcurrentUpdate)


def _countdown_cap() -> float:
    """The longest wait before a retry. A retried message waits unacknowledged in the worker until
    its countdown ends, so countdown + run time must stay under the broker's visibility timeout
    or the message is redelivered while it waits (a duplicate run: safe, but wasted)."""
    settings = runtime().settings
    room = settings.broker_visibility_timeout_s - settings.task_time_limit_s - 10
    return float(max(1, min(300, room)))
log = get_logger(__name__)


def _retry(
    task: Task,
    exc: Exception,
    *,
    quick: bool = False,
    kwargs: dict[str, int] | None = None,
    **ids: str,
) -> Exception:
    """Schedule the next attempt and say so in our own log (Celery's INFO lines are off).

    ``quick``: a dropped database connection — the work did not commit and a new connection is
    one pool checkout away, so the retry comes within a second or two, not after beat's sweep.
    ``kwargs``: the retry's keyword arguments instead of this run's (ints only, never secrets).
    """
    if quick:
        countdown = 0.2 + backoff_delay(task.request.retries, base=0.5, cap=5.0)
    else:
        countdown = 1.0 + backoff_delay(task.request.retries, base=2.0, cap=_countdown_cap())
    log.warning(
        "task retry scheduled",
        extra={
            "task": task.name,
            "attempt": task.request.retries + 1,
            "retry_in_s": round(countdown, 1),
            "error": type(exc).__name__,
            **ids,
        },
    )
    return task.retry(exc=exc, countdown=countdown, kwargs=kwargs)


@celery_app.task(bind=True, name="x402c.run_job", max_retries=8, acks_late=True)
def run_job(self: Task, job_id: str, claimed: int | None = None) -> str:
    """Run one action job (send, receive, verify, refund, release, void, balance).

    Returns only the job's outcome: the result itself lives in the job row (``GET /v1/jobs``),
    so it is neither copied into a result backend nor into Celery's own task log. ``running``:
    another worker holds the job (this message is a duplicate, or the job was taken over from this
    run after its lease expired: its writes were refused); it is acknowledged and dropped.

    ``claimed``: set by this task's own retry — the attempt number of the claim the failed run
    committed. The job may still say ``running`` under it (a dropped connection wrote nothing
    more), and this number lets the retry take it over instead of waiting out the lease.
    """
    handover = Handover(claimed)
    try:
        found = run_action(runtime(), job_id, handover)
    except RETRYABLE as exc:
        if getattr(exc, "retryable", True):
            raise _retry(self, exc, kwargs=_handing_over(handover), job_id=job_id) from exc
        raise
    except CONNECTION_ERRORS as exc:
        raise _retry(self, exc, quick=True, kwargs=_handing_over(handover), job_id=job_id) from exc
    return found.status


def _handing_over(handover: Handover) -> dict[str, int]:
    return {} if handover.attempts is None else {"claimed": handover.attempts}


@celery_app.task(bind=True, name="x402c.drive_payment", max_retries=8, acks_late=True)
def drive_payment(self: Task, payment_id: str) -> str:
    """Push a payment forward from whatever state it is in (settle, reconcile)."""
    try:
        return drive(runtime(), payment_id)
    except RETRYABLE as exc:
        raise _retry(self, exc, payment_id=payment_id) from exc
    except CONNECTION_ERRORS as exc:
        raise _retry(self, exc, quick=True, payment_id=payment_id) from exc


def _ticked(name: str) -> None:
    record_tick(runtime().engine, name)


@celery_app.task(name="x402c.expire_holds")
def expire_holds() -> int:
    _ticked("expire_holds")
    return maintenance.expire_holds(runtime())


@celery_app.task(name="x402c.reconcile_payments")
def reconcile_payments() -> int:
    _ticked("reconcile_payments")
    return maintenance.reconcile(runtime())


@celery_app.task(name="x402c.recheck_settlements")
def recheck_settlements() -> int:
    from connector.payments.confirmations import recheck_settlements as recheck

    return recheck(runtime())


@celery_app.task(name="x402c.requeue_stale_jobs")
def requeue_stale_jobs() -> int:
    _ticked("requeue_stale_jobs")
    return maintenance.requeue_stale_jobs(runtime())


@celery_app.task(name="x402c.purge_idempotency_keys")
def purge_idempotency_keys() -> int:
    _ticked("purge_idempotency_keys")
    with transaction(runtime().engine) as session:
        return purge_expired(session)


celery_app.conf.beat_schedule = {
    **(celery_app.conf.beat_schedule or {}),
    "expire-holds": {"task": "x402c.expire_holds", "schedule": 15.0},
    "reconcile-payments": {"task": "x402c.reconcile_payments", "schedule": 30.0},
    "recheck-settlements": {"task": "x402c.recheck_settlements", "schedule": 60.0},
    "requeue-stale-jobs": {"task": "x402c.requeue_stale_jobs", "schedule": 30.0},
    "purge-idempotency-keys": {"task": "x402c.purge_idempotency_keys", "schedule": 3600.0},
}
