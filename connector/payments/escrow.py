"""Holds and custodial escrow: ``release`` and ``void``.

* Manual capture: an incoming payment waits in ``authorized`` holding the payer's signed
  authorization. ``release`` settles it (capture); ``void`` drops it and nothing ever moves.
* Custodial escrow: the payer paid the connection's own (escrow) wallet. ``release`` forwards the
  funds to the beneficiary with a transfer signed by the escrow key — signed once, stored on the
  payment, then settled — and the payment ends ``released``.
* On-chain escrow (``authCapture``): the escrow contract holds the funds. ``release`` is the
  escrow's ``capture`` (any part of what is held, as often as wanted, with a fee within the
  signed bounds), ``void`` its ``void`` (everything still held goes back to the payer, also after
  a partial capture); see :mod:`connector.payments.escrow_operator`.
"""

from __future__ import annotations

import connector.payments.protocol as proto
from connector.errors import Conflict, NotFound, SettlementPending, ValidationFailed
from connector.payments import escrow_operator, offers
from connector.payments.context import ConnectionContext
from connector.payments.machine import transition, update_fields
from connector.payments.onchain import SETTLEMENT_PENDING, outcome
from connector.payments.receive import end_unmoved, settle_incoming
from connector.payments.states import PaymentState, check_transition
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment

S = PaymentState


def _load(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    if payment is None or payment.connection_id != ctx.id:
        raise NotFound(f"payment {payment_id} not found")
    return payment


def _escrow_payment(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> bool:
    """Whether ``payment_id`` is this connection's on-chain escrow payment (read once)."""
    payment = _load(rt, ctx, payment_id)
    return escrow_operator.is_escrow(payment)


def void(
    rt: Runtime, ctx: ConnectionContext, payment_id: str, *, key: str | None = None
) -> Payment:
    """Drop a hold. ``key`` (the job's id) makes an on-chain escrow void resumable."""
    if _escrow_payment(rt, ctx, payment_id):
        voided, _ = escrow_operator.operate(
            rt, ctx, payment_id, "void", key=key or f"void:{payment_id}"
        )
        return voided
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
        if payment is None or payment.connection_id != ctx.id:
            raise NotFound(f"payment {payment_id} not found")
        end_unmoved(uow.session, payment, S.VOIDED)
        uow.commit()
    if payment.payment_request_id:
        offers.cache_for(rt).forget_state(payment.payment_request_id)
    return payment


def release(
    rt: Runtime,
    ctx: ConnectionContext,
    payment_id: str,
    *,
    amount: int | None = None,
    fee_bps: int | None = None,
    key: str | None = None,
) -> Payment:
    """Capture a hold. On-chain escrow: ``amount`` (default: all still held) with ``fee_bps``
    (default: the signed minimum); ``key`` (the job's id) makes the capture resumable without
    ever capturing twice. Other holds are captured whole."""
    payment = _load(rt, ctx, payment_id)
    if payment.direction != "incoming":
        raise Conflict(f"payment {payment_id} is outgoing; only incoming holds can be released")
    if escrow_operator.is_escrow(payment):
        captured, _ = escrow_operator.operate(
            rt,
            ctx,
            payment_id,
            "capture",
            key=key or f"capture:{payment_id}",
            amount=amount,
            fee_bps=fee_bps,
        )
        return captured
    if fee_bps is not None:
        raise ValidationFailed(
            "`fee_bps` applies to on-chain escrow (authCapture) captures only", field="fee_bps"
        )
    if amount is not None and amount != payment.amount:
        raise ValidationFailed(
            f"payment {payment_id} is an `exact` hold: it is captured whole ({payment.amount}); "
            "partial capture needs on-chain escrow (authCapture)",
            field="amount",
        )
    if payment.state == S.AUTHORIZED.value:
        with UnitOfWork(rt.engine) as uow:
            current = uow.session.get(Payment, payment_id)
            assert current is not None
            transition(
                uow.session, current, S.SETTLING, settle_attempts=current.settle_attempts + 1
            )
            uow.commit()
        payment = _captured(rt, ctx, payment_id)
        if not payment.custodial or payment.state != S.SETTLED.value:
            return payment
    if payment.state == S.SETTLING.value:
        payment = _captured(rt, ctx, payment_id)
        if not payment.custodial or payment.state != S.SETTLED.value:
            return payment
    if payment.state == S.SETTLED.value and payment.custodial:
        return _forward_to_beneficiary(rt, ctx, payment)
    # Anything else: let the state machine explain why (409 illegal_transition).
    check_transition(payment.id, payment.state, S.RELEASED)
    raise Conflict(f"payment {payment_id} is not custodial; it was captured already")


def _captured(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    payment = settle_incoming(rt, ctx, payment_id)
    if payment.state == S.SETTLING.value:  # submitted, not mined yet: retried, never failed
        raise SettlementPending(
            f"capture of {payment_id} is pending on-chain", payment_id=payment_id
        )
    return payment


def _forward_to_beneficiary(rt: Runtime, ctx: ConnectionContext, payment: Payment) -> Payment:
    if payment.beneficiary is None:
        raise Conflict(f"payment {payment.id} has no beneficiary to release to")
    if payment.release_payload is None:
        amount = payment.amount - payment.refunded_amount
        requirement = proto.transfer_requirement(payment, pay_to=payment.beneficiary, amount=amount)
        account = ctx.account_for(payment.payee or "", f"the release of {payment.id}")
        signed = proto.sign_payment(account, requirement, 2, None)
        with UnitOfWork(rt.engine) as uow:
            current = uow.session.get(Payment, payment.id)
            assert current is not None
            if current.release_payload is None:
                update_fields(
                    uow.session,
                    current,
                    release_payload={
                        "payload": signed.wire,
                        "requirement": proto.requirement_to_wire(requirement, 2),
                    },
                )
                uow.commit()
            payment = current
    assert payment.release_payload is not None
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    answer = facilitator.settle(
        payment.release_payload["payload"], payment.release_payload["requirement"]
    )
    tx_hash = str(answer.get("transaction") or "") or None
    if not answer.get("success"):
        reason = str(answer.get("errorReason") or "facilitator refused")
        auth = payment.release_payload["payload"].get("payload", {}).get("authorization", {})
        verdict = outcome(
            rt,
            ctx,
            payment,
            tx_hash,
            pending=reason == SETTLEMENT_PENDING,
            nonce=str(auth.get("nonce") or ""),
            signer=str(auth.get("from") or ctx.wallet_address),
        )
        if verdict.unknown:
            raise SettlementPending(
                f"escrow release of {payment.id}: {reason}; the outcome is not known yet",
                payment_id=payment.id,
                tx_hash=verdict.tx_hash,
            )
        if not verdict.settled:
            raise Conflict(
                f"escrow release of {payment.id} failed: {reason}", payment_id=payment.id
            )
        tx_hash = verdict.tx_hash
    with UnitOfWork(rt.engine) as uow:
        current = uow.session.get(Payment, payment.id)
        assert current is not None
        if current.state == S.SETTLED.value:
            transition(uow.session, current, S.RELEASED, release_tx_hash=tx_hash)
            uow.commit()
        return current
