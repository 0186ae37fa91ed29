"""Periodic jobs that keep payments consistent whatever crashed (run by Celery beat).

* Holds expire a safety margin before the payer's authorization does, with a warning event
  (``payment.hold_expiring``) shortly before.
* Signed-but-unused outgoing authorizations expire at their ``validBefore``.
* Approvals that nobody decided expire.
* Payments stuck in ``settling`` are reconciled against the chain: a used nonce means the money
  moved (``settled``); an unused nonce past ``validBefore`` can never move (``failed``); otherwise
  the payment is driven again with the same authorization.
* Budget reservations of failed payments are released once their authorization has expired
  unused — before that the money could still move, so the budget keeps it (fail closed).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlmodel import col

from connector.errors import ConcurrentUpdate, ExternalServiceError, IllegalTransition
from connector.events.outbox import record_event
from connector.logs import get_logger
from connector.payments.machine import transition, update_fields
from connector.payments.onchain import authorization_used
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.policy import budgets
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, Reservation

log = get_logger(__name__)
S = PaymentState

HOLD_WARNING = timedelta(minutes=5)
SETTLING_GRACE = timedelta(seconds=60)
APPROVAL_TTL = timedelta(hours=24)


def expire_holds(rt: Runtime, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    changed = 0
    with UnitOfWork(rt.engine) as uow:
        held = (
            uow.session.execute(
                select(Payment).where(
                    col(Payment.state) == S.AUTHORIZED.value,
                    col(Payment.hold_expires_at).is_not(None),
                    col(Payment.hold_expires_at) <= now + HOLD_WARNING,
                )
            )
            .scalars()
            .all()
        )
        unused = (
            uow.session.execute(
                select(Payment).where(
                    col(Payment.state) == S.AUTHORIZED.value,
                    col(Payment.direction) == "outgoing",
                    col(Payment.valid_before).is_not(None),
                    col(Payment.valid_before) <= now,
                )
            )
            .scalars()
            .all()
        )
        stale_approvals = (
            uow.session.execute(
                select(Payment).where(
                    col(Payment.state) == S.REQUIRES_APPROVAL.value,
                    col(Payment.updated_at) <= now - APPROVAL_TTL,
                )
            )
            .scalars()
            .all()
        )
    for payment in [*held, *unused, *stale_approvals]:
        try:
            with UnitOfWork(rt.engine) as uow:
                current = uow.session.get(Payment, payment.id)
                if current is None or current.state != payment.state:
                    continue
                deadline = current.hold_expires_at
                if current.state == S.AUTHORIZED.value and deadline and deadline > now:
                    if not current.hold_warning_sent:
                        update_fields(uow.session, current, hold_warning_sent=True)
                        record_event(
                            uow.session,
                            "payment.hold_expiring",
                            current.connection_id,
                            {
                                "payment": payment_snapshot(current),
                                "expires_at": deadline.isoformat(),
                            },
                            payment_id=current.id,
                        )
                        uow.commit()
                    continue
                transition(uow.session, current, S.EXPIRED, now=now)
                budgets.release(uow.session, current.id)
                uow.commit()
                changed += 1
        except (ConcurrentUpdate, IllegalTransition):
            continue  # someone else moved it first; next sweep sees the new state
    return changed


def reconcile(rt: Runtime, now: datetime | None = None) -> int:
    """Resolve payments stuck in ``settling`` and release reservations that can no longer move."""
    from connector.payments.context_loader import load_connection

    now = now or datetime.now(UTC)
    resolved = 0
    with UnitOfWork(rt.engine) as uow:
        stuck = (
            uow.session.execute(
                select(Payment)
                .where(
                    col(Payment.state) == S.SETTLING.value,
                    col(Payment.updated_at) <= now - SETTLING_GRACE,
                )
                .limit(500)
            )
            .scalars()
            .all()
        )
        held_failed = (
            uow.session.execute(
                select(Payment)
                .join(Reservation, col(Reservation.payment_id) == col(Payment.id))
                .where(
                    col(Reservation.status) == "held",
                    col(Payment.state).in_((S.FAILED.value, S.EXPIRED.value)),
                    col(Payment.valid_before) <= now,
                )
                .limit(500)
            )
            .scalars()
            .all()
        )
    for payment in stuck:
        try:
            ctx = load_connection(rt, payment.connection_id)
            used = authorization_used(rt, ctx.rpc_url, payment)
        except ExternalServiceError:
            log.warning("reconcile: chain unreadable", extra={"payment_id": payment.id})
            continue
        try:
            with UnitOfWork(rt.engine) as uow:
                current = uow.session.get(Payment, payment.id)
                if current is None or current.state != S.SETTLING.value:
                    continue
                if used:
                    transition(uow.session, current, S.SETTLED, now=now)
                    budgets.confirm(uow.session, current.id)
                elif current.valid_before is not None and current.valid_before <= now:
                    transition(
                        uow.session,
                        current,
                        S.FAILED,
                        now=now,
                        failure_code="authorization_expired",
                        failure_reason="authorization expired unused while settling",
                    )
                    budgets.release(uow.session, current.id)
                else:
                    rt.dispatch("x402c.drive_payment", (current.id,))
                    continue
                uow.commit()
                resolved += 1
        except (ConcurrentUpdate, IllegalTransition):
            continue
    for payment in held_failed:
        try:
            ctx = load_connection(rt, payment.connection_id)
            used = authorization_used(rt, ctx.rpc_url, payment)
        except ExternalServiceError:
            continue
        with UnitOfWork(rt.engine) as uow:
            if used:
                # Money moved after all (a server settled late): the spend is real.
                budgets.confirm(uow.session, payment.id)
                record_event(
                    uow.session,
                    "payment.settled_late",
                    payment.connection_id,
                    {"payment": payment_snapshot(payment)},
                    payment_id=payment.id,
                )
            else:
                budgets.release(uow.session, payment.id)
            uow.commit()
    return resolved


def requeue_stale_jobs(
    rt: Runtime,
    now: datetime | None = None,
    *,
    queued_after: timedelta = timedelta(seconds=30),
    running_after: timedelta | None = None,
) -> int:
    """Re-enqueue jobs whose task message was lost.

    The broker is not the source of truth: a Redis worker killed between taking a message and
    recording it as unacknowledged loses that message. The job row survives, so jobs still
    ``queued`` (or ``running`` past the task time limit) are sent again. Re-running a job is safe:
    it resumes its own payment through the job id, and settlement is idempotent per nonce.
    """
    from connector.storage.models.payments import Job

    now = now or datetime.now(UTC)
    running_after = running_after or timedelta(seconds=rt.settings.task_time_limit_s + 30)
    with UnitOfWork(rt.engine) as uow:
        stale = list(
            uow.session.execute(
                select(Job)
                .where(
                    ((col(Job.status) == "queued") & (col(Job.updated_at) <= now - queued_after))
                    | (
                        (col(Job.status) == "running")
                        & (col(Job.updated_at) <= now - running_after)
                    )
                )
                .order_by(col(Job.updated_at))
                .limit(500)
            ).scalars()
        )
        for job in stale:
            job.updated_at = now  # not again before the next threshold
            uow.session.add(job)
        uow.commit()
    for job in stale:
        rt.dispatch("x402c.run_job", (job.id,))
    return len(stale)
