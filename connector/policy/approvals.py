"""Approvals for payments above the policy's threshold ("multi-signature" for high values).

A payment waits in ``requires_approval`` until N distinct *principals* (people, not keys)
approve it, or any one rejects it. A key minted through the API inherits its minter's principal,
so one admin holding several keys is still one approver; a principal approves once, and a key
minted after the payment was created by a principal who already approved it (or who minted an
earlier approver's key after the payment) cannot approve. An approval is bound to the amount and
payee the admin saw and expires; stale or mismatched approvals do not count. When the last
approval arrives the budget is checked again (it may have been spent meanwhile) and only then is
the authorization signed. Every decision is written to the audit log with the principal and key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from connector.audit import audit
from connector.errors import Conflict, NotFound
from connector.ids import new_id
from connector.payments.machine import transition
from connector.payments.states import PaymentState
from connector.storage.models.connections import AdminKey
from connector.storage.models.payments import Approval, Job, Payment

S = PaymentState


def valid_approvals(session: Session, payment: Payment, now: datetime) -> int:
    rows = session.execute(
        select(Approval).where(
            col(Approval.payment_id) == payment.id, col(Approval.decision) == "approve"
        )
    ).scalars()
    return len(
        {
            a.principal
            for a in rows
            if a.expires_at > now and a.amount == payment.amount and a.payee == payment.payee
        }
    )


def _accountable(session: Session, key_id: str, payment: Payment) -> tuple[str, set[str]]:
    """The key's principal, and every principal answerable for its approval: its own, plus its
    minter's when the key was minted after the payment was created (a fresh key made to approve
    this very payment speaks for whoever made it)."""
    key = session.get(AdminKey, key_id)
    if key is None:  # not a stored key (direct service use): the key is its own principal
        return f"key:{key_id}", {f"key:{key_id}"}
    people = {key.principal}
    if key.created_at > payment.created_at and key.created_by:
        minter = session.get(AdminKey, key.created_by)
        if minter is not None:
            people.add(minter.principal)
    return key.principal, people


def _requesters(session: Session, payment: Payment) -> tuple[set[str], set[str]]:
    """(key ids, principals) that asked for this payment and so may not approve it.

    The asking key itself never approves. Its principal is excluded too when it is a person's
    key (it holds the ``admin`` scope): an admin who sends and then approves is one pair of eyes.
    A machine key (``actions`` only, e.g. the workflow's agent) inherits its minter's principal,
    and that person approving what their agent asked for is the approval flow working as meant.
    """
    key_ids = {
        str(k)
        for k in session.execute(
            select(col(Job.requested_by)).where(
                col(Job.payment_id) == payment.id, col(Job.requested_by).is_not(None)
            )
        ).scalars()
    }
    people: set[str] = set()
    for key_id in key_ids:
        key = session.get(AdminKey, key_id)
        if key is not None and "admin" in (key.scopes or []):
            people.add(key.principal)
    return key_ids, people


def _check_four_eyes(session: Session, payment: Payment, key_id: str) -> str:
    principal, people = _accountable(session, key_id, payment)
    asking_keys, asking_people = _requesters(session, payment)
    if key_id in asking_keys or people & asking_people:
        raise Conflict(
            f"payment {payment.id} was asked for by this key or its principal; the approval must "
            "come from someone else",
            payment_id=payment.id,
            rule="four_eyes",
        )
    earlier = session.execute(
        select(Approval).where(
            col(Approval.payment_id) == payment.id, col(Approval.decision) == "approve"
        )
    ).scalars()
    for approval in earlier:
        _, theirs = _accountable(session, approval.admin_key_id, payment)
        theirs.add(approval.principal)
        shared = people & theirs
        if shared:
            raise Conflict(
                f"principal {sorted(shared)[0]} already approved payment {payment.id} "
                f"(with key {approval.admin_key_id}); approvals must come from different people",
                payment_id=payment.id,
            )
    return principal


def record_decision(
    session: Session,
    payment_id: str,
    *,
    admin_key_id: str,
    decision: str,
    ttl: timedelta,
    note: str | None = None,
    now: datetime | None = None,
    request_id: str | None = None,
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
    if decision == "approve":
        principal = _check_four_eyes(session, payment, admin_key_id)
    else:  # anyone may stop a payment: a rejection needs no distinct person
        principal = _accountable(session, admin_key_id, payment)[0]
    try:
        with session.begin_nested():
            session.add(
                Approval(
                    id=new_id("apr"),
                    payment_id=payment_id,
                    admin_key_id=admin_key_id,
                    principal=principal,
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
    approvals = valid_approvals(session, payment, now) if decision == "approve" else 0
    required = max(1, payment.approvals_required)
    audit(
        session,
        actor=admin_key_id,
        action=f"payment.{decision}",
        target_type="payment",
        target_id=payment_id,
        after={
            "decision": decision,
            "principal": principal,
            "admin_key_id": admin_key_id,
            "approvals": approvals,
            "approvals_required": required,
            "note": note,
        },
        request_id=request_id,
    )
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
    return payment, approvals >= required
