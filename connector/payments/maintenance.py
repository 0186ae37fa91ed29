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
* On-chain escrow (``authCapture``) payments are reconciled from the escrow contract: their
  events (read with ``paymentState`` as of one block, in bounded log ranges) are applied to the
  payment once they have the network's confirmations, so a capture, void, refund or reclaim
  done outside the connector is picked up; a disagreement between the events, our ledger and
  ``paymentState`` is logged and counted.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, select, update
from sqlmodel import Session, col

from connector.chain.auth_capture import EscrowSnapshot
from connector.errors import (
    ConcurrentUpdate,
    ExternalServiceError,
    IllegalTransition,
    ValidationFailed,
)
from connector.events.outbox import record_event
from connector.logs import get_logger
from connector.payments import escrow_ledger, escrow_onchain, escrow_sync
from connector.payments.context import ConnectionContext
from connector.payments.machine import transition, update_fields
from connector.payments.onchain import authorization_used, can_never_move
from connector.payments.receive import end_unmoved
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.policy import budgets
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, Refund, Reservation
from connector.x402.auth_capture import SCHEME_ALIASES

log = get_logger(__name__)
S = PaymentState

HOLD_WARNING = timedelta(minutes=5)
SETTLING_GRACE = timedelta(seconds=60)
#: Rows one reconcile pass reads per kind; the next pass (beat, every 30 s) takes the rest.
RECONCILE_BATCH = 500
#: How long after its deadline a failed payment's authorization is still checked on-chain.
LATE_WINDOW = timedelta(hours=1)
APPROVAL_TTL = timedelta(hours=24)
#: Consecutive reconcile passes that could not read a chain's escrow before it is a warning.
UNREADABLE_PASSES_TO_WARN = 3

#: Escrow payments the reconciler keeps reading: a collection in flight, or money the escrow may
#: still move (held: capture, void, reclaim; captured: refund).
ESCROW_WATCHED = (S.SETTLING, S.AUTHORIZED, S.CAPTURED, S.PARTIALLY_REFUNDED)
_ESCROW = sorted(SCHEME_ALIASES)


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
                funded = escrow_ledger.collected(current)
                if funded and not (deadline and deadline > now and not current.hold_warning_sent):
                    # Held by the escrow contract: the hold ends on-chain (capture deadline, then
                    # the payer's reclaim), and reconciliation reads how. Only the warning is ours.
                    continue
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
                end_unmoved(uow.session, current, S.EXPIRED, now=now)
                uow.commit()
                changed += 1
        except (ConcurrentUpdate, IllegalTransition):
            continue  # someone else moved it first; next sweep sees the new state
    return changed


def reconcile(rt: Runtime, now: datetime | None = None) -> int:
    """Decide every payment whose outcome is unknown, and correct any that the chain contradicts.

    * ``settling`` payments (no progress for :data:`SETTLING_GRACE`): a used nonce means
      ``settled``; an unused one that can never move any more means ``failed`` (reservation
      released); otherwise the payment is driven again with the same authorization.
    * refunds in flight: likewise, from the refund's own nonce.
    * ``failed`` payments whose authorization could still have been used (reservation still
      held, or deadline within :data:`LATE_WINDOW`): a used nonce corrects the payment to
      ``settled`` with a ``payment.settled_late`` event and counts its reservation again;
      an unused one past its deadline releases a held reservation.
    Jobs that already reported such a payment follow it in the same transaction (the state
    machine's :func:`connector.actions.outcome.follow_payment`).
    """
    now = now or datetime.now(UTC)
    resolved = _reconcile_settling(rt, now)
    resolved += _reconcile_escrow(rt, now)
    resolved += _reconcile_refunds(rt, now)
    resolved += _reconcile_failed(rt, now)
    return resolved


def _batch(rt: Runtime, statement: Select[Any]) -> list[Any]:
    """Read one bounded batch of rows to reconcile in a short transaction of its own, so no
    transaction stays open across the chain reads that follow."""
    with UnitOfWork(rt.engine) as uow:
        return list(uow.session.execute(statement.limit(RECONCILE_BATCH)).scalars().all())


def _reconcile_settling(rt: Runtime, now: datetime) -> int:
    from connector.payments.context_loader import load_connection

    resolved = 0
    stuck = _batch(
        rt,
        select(Payment).where(
            col(Payment.state) == S.SETTLING.value,
            col(Payment.updated_at) <= now - SETTLING_GRACE,
            col(Payment.scheme).not_in(_ESCROW),  # decided from the escrow: _reconcile_escrow
        ),
    )
    for payment in stuck:
        try:
            ctx = load_connection(rt, payment.connection_id)
            used = authorization_used(rt, ctx.rpc_url, payment)
            dead = not used and can_never_move(rt, ctx.rpc_url, payment.valid_before, now)
        except ExternalServiceError:
            log.warning("reconcile: chain unreadable", extra={"payment_id": payment.id})
            continue
        try:
            with UnitOfWork(rt.engine) as uow:
                current = uow.session.get(Payment, payment.id)
                if current is None or current.state != S.SETTLING.value:
                    continue
                if used:
                    # (the jobs that reported it follow it: the state machine sees to that)
                    transition(uow.session, current, S.SETTLED, now=now)
                    budgets.confirm(uow.session, current.id)
                elif dead:
                    end_unmoved(
                        uow.session,
                        current,
                        S.FAILED,
                        now=now,
                        failure_code="authorization_expired",
                        failure_reason="authorization expired unused while settling",
                    )
                else:
                    rt.dispatch("x402c.drive_payment", (current.id,))
                    continue
                uow.commit()
                resolved += 1
        except (ConcurrentUpdate, IllegalTransition):
            continue
    return resolved


def _escrow_batch(rt: Runtime, now: datetime) -> list[Payment]:
    """One bounded batch of escrow payments to read, resuming after the last one read by this
    process (a cursor on the id), so a long list of open escrows is read round-robin rather than
    its oldest rows over and over."""
    cursor: dict[str, str] = rt._cached(("escrow_reconcile_cursor",), dict)
    after = cursor.get("after", "")
    statement = (
        select(Payment)
        .where(
            col(Payment.scheme).in_(_ESCROW),
            col(Payment.state).in_([s.value for s in ESCROW_WATCHED]),
            # a collection just handed over is its job's to finish first
            (col(Payment.state) != S.SETTLING.value)
            | (col(Payment.updated_at) <= now - SETTLING_GRACE),
            col(Payment.id) > after,
        )
        .order_by(col(Payment.id))
    )
    rows: list[Payment] = _batch(rt, statement)
    cursor["after"] = rows[-1].id if len(rows) == RECONCILE_BATCH else ""
    return rows


def _escrow_settled_for_good(payment: Payment, now: datetime) -> bool:
    """Nothing can move any more: nothing held, and nothing refundable or past the refund
    deadline (with a margin for the chain's clock). Such a payment is not read again."""
    totals = escrow_ledger.totals_of(payment)
    if not totals.collected or totals.held > 0:
        return False
    if totals.refundable == 0:
        return True
    try:
        info, _ = escrow_onchain.terms_of(payment)
    except ValidationFailed:
        return False
    return now.timestamp() > info.refund_expiry + LATE_WINDOW.total_seconds()


def _reconcile_escrow(rt: Runtime, now: datetime) -> int:
    """Read each watched escrow payment's events and ``paymentState`` as of one block and apply
    what is new and deep enough (:func:`connector.payments.escrow_sync.read_many`: a few JSON-RPC
    batches per chain, not two round trips per payment; each payment's logs from where its last
    read stopped, in bounded ranges; the state as of the newest block with the network's
    confirmations): both directions, whoever did the operation. A
    collection in flight that the escrow does not show is decided like an ``exact`` settlement:
    unused nonce past its deadline → ``failed`` (reservation released, paywall slot given
    back); otherwise it is driven again with the same authorization. Returns how many payments
    changed."""
    from connector.payments.context_loader import load_connection

    contexts: dict[str, ConnectionContext] = {}  # one read per connection per pass
    by_chain: dict[str, list[tuple[Payment, ConnectionContext]]] = {}
    for payment in _escrow_batch(rt, now):
        if payment.state == S.AUTHORIZED.value and not escrow_ledger.collected(payment):
            continue  # signed, not handed to anyone yet: its own job sends it (or it expires)
        if _escrow_settled_for_good(payment, now):
            continue
        try:
            escrow_onchain.terms_of(payment)
            ctx = contexts.get(payment.connection_id) or load_connection(rt, payment.connection_id)
        except ValidationFailed:
            log.warning("reconcile: escrow payment without terms", extra={"payment_id": payment.id})
            continue
        except ExternalServiceError:
            continue
        contexts[payment.connection_id] = ctx
        by_chain.setdefault(ctx.rpc_url, []).append((payment, ctx))
    changed = 0
    for rpc_url, group in by_chain.items():
        failures: dict[str, int] = rt._cached(("escrow_unreadable_passes",), dict)
        # One chain per RPC URL: its payments' networks agree; the deepest requirement wins.
        depth = max(escrow_sync.confirmations(rt, payment) for payment, _ in group)
        try:
            read = escrow_sync.read_many(
                rt.chain(rpc_url), [payment for payment, _ in group], depth=depth
            )
        except ExternalServiceError as exc:
            failures[rpc_url] = failures.get(rpc_url, 0) + 1
            # One missed pass is routine (a slow node, a restart): the next pass reads it, and
            # nothing is decided from a failed read. Persistent failure is the operator's business.
            level = (
                logging.WARNING if failures[rpc_url] >= UNREADABLE_PASSES_TO_WARN else logging.INFO
            )
            log.log(
                level,
                "reconcile: escrow unreadable",
                extra={
                    "payments": len(group),
                    "error": type(exc).__name__,
                    # the node's own words: "block range too large" names the setting to lower
                    "detail": exc.detail[:200],
                    "consecutive_passes": failures[rpc_url],
                },
            )
            continue
        failures.pop(rpc_url, None)
        for payment, ctx in group:
            changed += _reconcile_one_escrow(rt, ctx, payment, read[payment.id], now)
    return changed


def _reconcile_one_escrow(
    rt: Runtime, ctx: ConnectionContext, payment: Payment, snapshot: EscrowSnapshot, now: datetime
) -> int:
    try:
        applied = escrow_sync.apply_read(rt, payment, snapshot, now=now)
    except (ConcurrentUpdate, IllegalTransition):
        return 0
    if escrow_ledger.collected(applied.payment) or snapshot.confirmed:
        escrow_sync.check_ledger(applied.payment, snapshot)
        return int(applied.changed)
    if snapshot.unconfirmed or not snapshot.complete or payment.state != S.SETTLING.value:
        # Mined but not deep enough yet, or a long history still being read: the next pass
        # goes on from here. Nothing is decided from a partial picture.
        return 0
    try:
        used = authorization_used(rt, ctx.rpc_url, payment)
        dead = not used and can_never_move(rt, ctx.rpc_url, payment.valid_before, now)
    except ExternalServiceError:
        return 0
    if used:
        # The token spent the nonce but the escrow shows no collection at this block: a node
        # behind another, or logs not indexed yet. Unknown: read again next pass.
        log.warning(
            "reconcile: escrow nonce used without escrow events", extra={"payment_id": payment.id}
        )
        return 0
    try:
        with UnitOfWork(rt.engine) as uow:
            current = uow.session.get(Payment, payment.id)
            if current is None or current.state != S.SETTLING.value:
                return 0
            if not dead:
                rt.dispatch("x402c.drive_payment", (current.id,))
                return 0
            end_unmoved(
                uow.session,
                current,
                S.FAILED,
                now=now,
                failure_code="authorization_expired",
                failure_reason="escrow collection's authorization expired unused",
            )
            uow.commit()
            return 1
    except (ConcurrentUpdate, IllegalTransition):
        return 0


def _reconcile_refunds(rt: Runtime, now: datetime) -> int:
    from connector.payments.context_loader import load_connection
    from connector.payments.refunds import finish_refund, refund_valid_before

    resolved = 0
    stuck = _batch(
        rt,
        select(Refund).where(
            col(Refund.state).in_(("pending", "settling")),
            col(Refund.updated_at) <= now - SETTLING_GRACE,
        ),
    )
    for refund in stuck:
        try:
            with UnitOfWork(rt.engine) as uow:
                payment = uow.session.get(Payment, refund.payment_id)
            if payment is None or refund.nonce is None:
                continue
            ctx = load_connection(rt, payment.connection_id)
            chain = rt.chain(ctx.rpc_url)
            used = bool(chain.authorization_state(payment.asset, payment.payee, refund.nonce))
            deadline = refund_valid_before(refund)
            dead = not used and can_never_move(rt, ctx.rpc_url, deadline, now)
        except ExternalServiceError:
            continue
        if not (used or dead):
            continue  # the refund job's retry (or the next pass) decides it
        try:
            finish_refund(rt, refund.id, succeeded=used, tx_hash=refund.tx_hash, reason="expired")
            resolved += 1
        except (ConcurrentUpdate, IllegalTransition):
            continue
    return resolved


def _reconcile_failed(rt: Runtime, now: datetime) -> int:
    from connector.payments.context_loader import load_connection

    resolved = 0
    held = select(col(Reservation.payment_id)).where(col(Reservation.status) == "held")
    candidates = _batch(
        rt,
        select(Payment)
        .where(
            col(Payment.state).in_((S.FAILED.value, S.EXPIRED.value)),
            col(Payment.nonce).is_not(None),
            col(Payment.id).in_(held) | (col(Payment.valid_before) > now - LATE_WINDOW),
        )
        .order_by(col(Payment.updated_at)),
    )
    for payment in candidates:
        try:
            ctx = load_connection(rt, payment.connection_id)
            used = authorization_used(rt, ctx.rpc_url, payment)
            dead = not used and can_never_move(rt, ctx.rpc_url, payment.valid_before, now)
        except ExternalServiceError:
            continue
        if not (used or dead):
            continue
        if used and payment.state == S.FAILED.value and escrow_sync.is_escrow(payment):
            resolved += _escrow_funded_late(rt, payment, now)
            continue
        try:
            with UnitOfWork(rt.engine) as uow:
                current = uow.session.get(Payment, payment.id)
                if current is None or current.state != payment.state:
                    continue
                if used and current.state == S.FAILED.value:
                    # Money moved after all: the spend is real, the payment is settled.
                    failed_because = current.failure_reason
                    transition(
                        uow.session,
                        current,
                        S.SETTLED,
                        now=now,
                        failure_code=None,
                        failure_reason=None,
                        event_extra={"corrected_from": "failed"},
                    )
                    budgets.recount(uow.session, current.id)
                    record_event(
                        uow.session,
                        "payment.settled_late",
                        current.connection_id,
                        {
                            "payment": payment_snapshot(current),
                            "previous_failure": failed_because,
                        },
                        payment_id=current.id,
                    )
                    log.warning("payment settled late", extra={"payment_id": current.id})
                    resolved += 1
                elif used:
                    budgets.recount(uow.session, current.id)
                elif not budgets.release(uow.session, current.id):
                    continue
                uow.commit()
        except (ConcurrentUpdate, IllegalTransition):
            continue
    return resolved


def _escrow_funded_late(rt: Runtime, payment: Payment, now: datetime) -> int:
    """A failed escrow collection whose nonce is used: the escrow funded it after all. Its
    events correct it (``failed → authorized``/``captured``, then whatever followed), with a
    ``payment.settled_late`` event, its reservation counted again by the ledger, and the jobs
    that reported it failed follow it (the state machine). Without readable events: next pass."""
    from connector.payments.context_loader import load_connection

    try:
        ctx = load_connection(rt, payment.connection_id)
        depth = escrow_sync.confirmations(rt, payment)
        snapshot = escrow_sync.read(rt.chain(ctx.rpc_url), payment, depth=depth)
    except (ExternalServiceError, ValidationFailed):
        return 0
    if not snapshot.confirmed:
        return 0  # nothing that counts yet (or nothing at all): next pass
    failed_because = payment.failure_reason

    def then(session: Session, current: Payment) -> None:
        record_event(
            session,
            "payment.settled_late",
            current.connection_id,
            {"payment": payment_snapshot(current), "previous_failure": failed_because},
            payment_id=current.id,
        )

    try:
        applied = escrow_sync.apply_read(rt, payment, snapshot, now=now, then=then)
    except (ConcurrentUpdate, IllegalTransition):
        return 0
    if applied.changed:
        log.warning("escrow payment funded late", extra={"payment_id": payment.id})
    return int(applied.changed)


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
    ``queued`` (or ``running`` past their lease: the task time limit and a margin, see
    :func:`connector.jobs.job_lease`) are sent again. Re-running a job is safe: it resumes its own
    payment through the job id, and settlement is idempotent per nonce.

    A ``running`` job whose lease expired goes back to ``queued``: its worker is gone, and the
    message sent here must find a job it may claim. One conditional statement picks and marks
    the jobs, so a job claimed meanwhile (by a redelivered message) keeps its new lease and is
    not sent again.
    """
    from connector.jobs import JOBS, RUNNING, job_lease

    now = now or datetime.now(UTC)
    running_after = running_after or job_lease(rt.settings)
    stale = ((JOBS.c.status == "queued") & (JOBS.c.updated_at <= now - queued_after)) | (
        (JOBS.c.status == RUNNING) & (JOBS.c.updated_at <= now - running_after)
    )
    oldest = select(JOBS.c.id).where(stale).order_by(JOBS.c.updated_at).limit(500)
    with UnitOfWork(rt.engine) as uow:
        ids = list(
            uow.session.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(oldest), stale)
                # not again before the next threshold; a dead lease is back in the queue
                .values(status="queued", updated_at=now)
                .returning(JOBS.c.id)
            ).scalars()
        )
        uow.commit()
    for job_id in ids:
        rt.dispatch("x402c.run_job", (job_id,))
    return len(ids)
