"""Push one payment forward from whatever state it is in. Safe to call any number of times."""

from __future__ import annotations

from connector.errors import NotFound
from connector.payments.context_loader import load_connection
from connector.payments.receive import settle_incoming
from connector.payments.send import execute_send
from connector.payments.states import PaymentState
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment

S = PaymentState


def drive(rt: Runtime, payment_id: str) -> str:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    if payment is None:
        raise NotFound(f"payment {payment_id} not found")
    ctx = load_connection(rt, payment.connection_id)
    if payment.direction == "outgoing" and payment.state in (S.AUTHORIZED, S.SETTLING):
        payment, _ = execute_send(rt, ctx, payment_id)
    elif payment.direction == "incoming" and payment.state == S.SETTLING:
        payment = settle_incoming(rt, ctx, payment_id)
    return payment.state
