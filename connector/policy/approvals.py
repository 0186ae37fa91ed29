"""Approvals for payments above the policy's threshold ("multi-signature" for high values).

A payment waits in ``requires_approval`` until N distinct admin keys approve it, or any one
rejects it. An approval is bound to the amount and payee the admin saw and expires; stale or
mismatched approvals do not count. When the last approval arrives the budget is checked again
(it may have been spent meanwhile) and only then is the authorization signed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from connector.errors import Conflict, NotFound
from connector.ids import new_id
from connector.payments.machine import transition
from connector.payments.states import PaymentState
from connector.storage.models.payments import Approval, Payment

S = PaymentState


def valid_approvals(session: Session, payment: Payment, now: datetime) -> int:
    rows = session.execute(
        select(Approval).where(
            col(Approval.payment_id) == payment.id, col(Approval.decision) == "approve"
        )
    ).scalars()
    return len(
        {
            a.admin_key_id
            for a in rows
            if a.expires_at > now and a.amount == payment.amount and a.payee == payment.payee
        }
    )


def record_decision(
    session: Session,
    payment_id: str,
    *,
    admin_key_id: str,
    decision: str,
    ttl: timedelta,
    note: str | None = None,
    now: datetime | None = None,
) -> tuple[Payment, bool]:
    """Store one admin's decision. Returns (payment, ready): ``ready`` means enough approvals."""
    now = now or datetime.now(UTC)
    payment = session.get(Payment, payment_id)
    if payment is None:
        raise NotFound(f"payment {payment_id} not found")
    if payment.state != S.REQUIRES_APPROVAL.value:
        raise Conflict(
            f"payment {payment_id} is {payment.state}, not waiting for approval",
            payment_id=payment_id,
        )
    if decision not in ("approve", "reject"):
        raise ValueError(decision)
    try:
        with session.begin_nested():
            session.add(
                Approval(
                    id=new_id("apr"),
                    payment_id=payment_id,
                    admin_key_id=admin_key_id,
                    decision=decision,
                    amount=payment.amount,
                    payee=payment.payee,
                    note=note,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
    except IntegrityError as exc:
        raise Conflict(
            f"admin key {admin_key_id} already decided on payment {payment_id}",
            payment_id=payment_id,
        ) from exc
    if decision == "reject":
        transition(
            session,
            payment,
            S.REJECTED,
            now=now,
            failure_code="approval_rejected",
            failure_reason=f"rejected by {admin_key_id}" + (f": {note}" if note else ""),
        )
        return payment, False
    return payment, valid_approvals(session, payment, now) >= max(1, payment.approvals_required)
