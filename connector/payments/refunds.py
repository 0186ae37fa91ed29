"""Refunds: full or partial, several allowed, never more than settled, idempotent by key.

The ``exact`` scheme cannot be reversed, so a refund is a new EIP-3009 transfer from the payee's
wallet (or the escrow's) back to the payer, settled through the same facilitator. Like a send it
is signed once and stored on its :class:`Refund` row before the first settle attempt.

An on-chain escrow payment (``authCapture``) is refunded by the escrow's own ``refund`` (the
operator sends it; nothing is signed by the payee): each refund is still one :class:`Refund` row
(amount, state, transaction, idempotency key), recorded with the payment's escrow operation in
one transaction; it succeeds when the escrow's ``PaymentRefunded`` event is applied, and never
exceeds what was captured and not yet refunded, nor runs past the refund deadline
(:mod:`connector.payments.escrow_operator`). The payment does not pass through ``refunding``:
its state comes from the escrow's events.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlmodel import Session, col

import connector.payments.protocol as proto
from connector.errors import (
    ConcurrentUpdate,
    Conflict,
    NotFound,
    SettlementPending,
    ValidationFailed,
)
from connector.ids import new_id
from connector.payments import escrow_operator
from connector.payments.context import ConnectionContext
from connector.payments.machine import transition
from connector.payments.onchain import SETTLEMENT_PENDING, outcome
from connector.payments.states import PaymentState
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, Refund

S = PaymentState
REFUNDABLE = {S.SETTLED.value, S.PARTIALLY_REFUNDED.value}


def _in_flight_total(session: Session, payment_id: str) -> int:
    rows = session.execute(
        select(col(Refund.amount)).where(
            col(Refund.payment_id) == payment_id, col(Refund.state).in_(("pending", "settling"))
        )
    ).scalars()
    return sum(int(a) for a in rows)


def start_refund(
    rt: Runtime,
    ctx: ConnectionContext,
    payment_id: str,
    amount: int | None,
    reason: str | None,
    idempotency_key: str | None,
) -> Refund:
    """Create (or find) the refund and sign its transfer; moves the payment to ``refunding``.
    On-chain escrow: plans (and runs) the escrow refund instead; see :func:`settle_refund`."""
    if _is_escrow_refund(rt, ctx, payment_id):
        key = idempotency_key or new_id("key")
        _, refund = escrow_operator.operate(
            rt, ctx, payment_id, "refund", key=key, amount=amount, reason=reason
        )
        assert refund is not None
        return refund
    with UnitOfWork(rt.engine) as uow:
        session = uow.session
        if idempotency_key is not None:
            found = session.execute(
                select(Refund).where(
                    col(Refund.payment_id) == payment_id,
                    col(Refund.idempotency_key) == idempotency_key,
                )
            ).scalar_one_or_none()
            if isinstance(found, Refund):
                return found
        payment = session.get(Payment, payment_id)
        if payment is None or payment.connection_id != ctx.id:
            raise NotFound(f"payment {payment_id} not found")
        if payment.direction != "incoming":
            raise Conflict(
                f"payment {payment_id} is outgoing: only the payee can refund it",
                payment_id=payment_id,
            )
        remaining = payment.amount - payment.refunded_amount - _in_flight_total(session, payment_id)
        value = remaining if amount is None else amount
        if remaining <= 0 or value <= 0:
            raise Conflict(
                f"payment {payment_id} has nothing left to refund", payment_id=payment_id
            )
        if value > remaining:
            raise ValidationFailed(
                f"refund of {value} exceeds the {remaining} still refundable", field="amount"
            )
        if payment.payer is None:
            raise Conflict(f"payment {payment_id} has no known payer", payment_id=payment_id)
        account = ctx.account_for(payment.payee or "", f"a refund of {payment_id}")
        # The transition check refuses refunds of unsettled, released or in-refund payments.
        transition(session, payment, S.REFUNDING)
        requirement = proto.transfer_requirement(payment, pay_to=payment.payer, amount=value)
        signed = proto.sign_payment(account, requirement, 2, None)
        refund = Refund(
            id=new_id("ref"),
            payment_id=payment_id,
            amount=value,
            state="pending",
            idempotency_key=idempotency_key,
            reason=reason,
            nonce=signed.nonce,
            signed_payload={
                "payload": signed.wire,
                "requirement": proto.requirement_to_wire(requirement, 2),
            },
        )
        session.add(refund)
        uow.commit()
        return refund


def _is_escrow_refund(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> bool:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    if payment is None or payment.connection_id != ctx.id:
        raise NotFound(f"payment {payment_id} not found")
    return escrow_operator.is_escrow(payment) and payment.direction == "incoming"


def settle_refund(rt: Runtime, ctx: ConnectionContext, refund_id: str) -> tuple[Refund, Payment]:
    """Settle a pending refund with its stored authorization; safe to call again."""
    with UnitOfWork(rt.engine) as uow:
        refund = uow.session.get(Refund, refund_id)
        if refund is None:
            raise NotFound(f"refund {refund_id} not found")
        payment = uow.session.get(Payment, refund.payment_id)
        assert payment is not None
        if refund.state in ("succeeded", "failed"):
            return refund, payment
    if escrow_operator.is_escrow(payment) and refund.nonce is None:
        # An escrow refund: resumed through its operation (the refund's idempotency key).
        assert refund.idempotency_key is not None
        payment, row = escrow_operator.operate(
            rt, ctx, payment.id, "refund", key=refund.idempotency_key
        )
        assert row is not None
        return row, payment
    with UnitOfWork(rt.engine) as uow:
        refund = uow.session.get(Refund, refund_id)
        assert refund is not None
        refund.state = "settling"
        refund.updated_at = datetime.now(UTC)
        uow.session.add(refund)
        uow.commit()
    assert refund.signed_payload is not None
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    answer = facilitator.settle(
        refund.signed_payload["payload"], refund.signed_payload["requirement"]
    )
    tx_hash = str(answer.get("transaction") or "") or None
    if answer.get("success"):
        return finish_refund(rt, refund_id, succeeded=True, tx_hash=tx_hash)
    reason = str(answer.get("errorReason") or "facilitator refused")
    verdict = outcome(
        rt,
        ctx,
        payment,
        tx_hash or refund.tx_hash,
        pending=reason == SETTLEMENT_PENDING,
        nonce=refund.nonce,
        signer=payment.payee,
    )
    if verdict.unknown:
        # Submitted, outcome unknown: the refund stays in flight (the payment in ``refunding``,
        # so no second refund can start); the job retries, the reconciler reads the chain.
        if verdict.tx_hash and verdict.tx_hash != refund.tx_hash:
            with UnitOfWork(rt.engine) as uow:
                row = uow.session.get(Refund, refund_id)
                if row is not None and row.state == "settling":
                    row.tx_hash = verdict.tx_hash
                    row.updated_at = datetime.now(UTC)
                    uow.session.add(row)
                    uow.commit()
        raise SettlementPending(
            f"refund {refund_id}: {reason}; the outcome is not known yet",
            payment_id=payment.id,
            tx_hash=verdict.tx_hash,
        )
    return finish_refund(
        rt, refund_id, succeeded=verdict.settled, tx_hash=verdict.tx_hash, reason=reason
    )


def refund_valid_before(refund: Refund) -> datetime | None:
    """The deadline of the refund's signed authorization (after it, it can never move)."""
    try:
        auth = (refund.signed_payload or {})["payload"]["payload"]["authorization"]
        return datetime.fromtimestamp(int(auth["validBefore"]), UTC)
    except (KeyError, TypeError, ValueError):
        return None


def finish_refund(
    rt: Runtime,
    refund_id: str,
    *,
    succeeded: bool,
    tx_hash: str | None = None,
    reason: str | None = None,
) -> tuple[Refund, Payment]:
    """Give an in-flight refund its final state and move its payment on, in one transaction.

    Idempotent: a refund that already finished is returned as it is (the job's retry and the
    reconciler may both get here; the one that loses the race re-reads and returns the result).
    """
    try:
        return _finish_refund(rt, refund_id, succeeded, tx_hash, reason)
    except ConcurrentUpdate:
        return _finish_refund(rt, refund_id, succeeded, tx_hash, reason)


def _finish_refund(
    rt: Runtime, refund_id: str, succeeded: bool, tx_hash: str | None, reason: str | None
) -> tuple[Refund, Payment]:
    with UnitOfWork(rt.engine) as uow:
        refund_row = uow.session.get(Refund, refund_id)
        assert refund_row is not None
        payment_row = uow.session.get(Payment, refund_row.payment_id)
        assert payment_row is not None
        if refund_row.state in ("succeeded", "failed"):
            return refund_row, payment_row
        if succeeded:
            refund_row.state = "succeeded"
            refund_row.tx_hash = tx_hash or refund_row.tx_hash
            total = payment_row.refunded_amount + refund_row.amount
            target = S.REFUNDED if total >= payment_row.amount else S.PARTIALLY_REFUNDED
            transition(
                uow.session,
                payment_row,
                target,
                refunded_amount=total,
                event_extra={"refund": {"id": refund_row.id, "amount": str(refund_row.amount)}},
            )
        else:
            refund_row.state = "failed"
            refund_row.failure_reason = (reason or "facilitator refused")[:1000]
            back = S.SETTLED if payment_row.refunded_amount == 0 else S.PARTIALLY_REFUNDED
            transition(uow.session, payment_row, back, failure_reason=refund_row.failure_reason)
        refund_row.updated_at = datetime.now(UTC)
        uow.session.add(refund_row)
        uow.commit()
        return refund_row, payment_row
