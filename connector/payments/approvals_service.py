"""Approve or reject a payment waiting in ``requires_approval``; sign when enough approved."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import connector.payments.protocol as proto
from connector.payments import send
from connector.payments.context_loader import load_connection
from connector.payments.machine import advance
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.policy.approvals import record_decision
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment


def decide(
    rt: Runtime,
    payment_id: str,
    *,
    admin_key_id: str,
    decision: str,
    note: str | None,
    request_id: str | None = None,
) -> dict[str, Any]:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
        ctx = load_connection(rt, payment.connection_id) if payment is not None else None
    with UnitOfWork(rt.engine) as uow:
        ttl = timedelta(hours=ctx.policy.approval_ttl_hours) if ctx else timedelta(hours=24)
        payment, ready = record_decision(
            uow.session,
            payment_id,
            admin_key_id=admin_key_id,
            decision=decision,
            ttl=ttl,
            note=note,
            request_id=request_id,
        )
        if ready and ctx is not None and payment.requirement is not None:
            requirement = proto.requirement_from_stored(
                payment.requirement, payment.x402_version or 2
            )
            now = datetime.now(UTC)
            steps = send.decide(
                uow.session, rt, ctx, payment, requirement, None, None, None, now, approved=True
            )
            advance(uow.session, payment, steps, now=now)
        uow.commit()
    if payment.state == PaymentState.AUTHORIZED:
        rt.dispatch("x402c.drive_payment", (payment.id,))
    return payment_snapshot(payment)
