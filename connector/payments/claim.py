"""Recording a paywall payment together with the slot it claims.

A payment request's slots (``paid_count < max_payments``) are claimed by a conditional UPDATE in
the same transaction that records the payment (created → authorized [→ settling], with its
events), committed before any money can move. Never oversold, and no lock is held across a
network call: the request row is locked only while that transaction commits.

On PostgreSQL the whole transaction is one statement in autocommit mode
(:func:`connector.payments.machine.insert_payment_guarded`): the claim runs first and the payment
is inserted only if it matched, in one round trip. Elsewhere it is a unit of work whose *last*
statement is the claim, so the row lock lasts only for the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, update
from sqlmodel import SQLModel

from connector.payments.machine import Step, insert_payment, insert_payment_guarded, writes_alone
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment

REQUESTS: Table = SQLModel.metadata.tables["payment_requests"]

#: Take one slot of an open request; RETURNING what the paywall's cache remembers.
CLAIM = (
    update(REQUESTS)
    .where(
        REQUESTS.c.id == bindparam("claim_id"),
        REQUESTS.c.status == "open",
        REQUESTS.c.paid_count < REQUESTS.c.max_payments,
    )
    .values(paid_count=REQUESTS.c.paid_count + 1)
    .returning(REQUESTS.c.status, REQUESTS.c.paid_count, REQUESTS.c.max_payments)
)


def record_and_claim(
    rt: Runtime, payment: Payment, steps: Sequence[Step], request_id: str, now: datetime
) -> tuple[str, int, int] | None:
    """Record ``payment`` (taking ``steps``) and claim one slot of ``request_id``, atomically.

    Returns the request's ``(status, paid_count, max_payments)`` after the claim, or None when no
    slot was left (then nothing was written). Raises :class:`~sqlalchemy.exc.IntegrityError`
    when this authorization is already recorded (nothing written either).
    """
    if writes_alone(rt.engine):
        row = insert_payment_guarded(
            rt.engine, payment, CLAIM, {"claim_id": request_id}, now=now, then=steps
        )
        return None if row is None else _state(row)
    with UnitOfWork(rt.engine) as uow:
        insert_payment(uow.session, payment, now=now, then=steps)
        uow.session.flush()
        # The claim comes last, so the row lock is held only for the commit.
        claimed = uow.session.execute(CLAIM, {"claim_id": request_id}).one_or_none()
        if claimed is None:
            uow.rollback()
            return None
        uow.commit()
    return _state(claimed)


def _state(row: Any) -> tuple[str, int, int]:
    status, paid_count, max_payments = row
    return str(status), int(paid_count), int(max_payments)
