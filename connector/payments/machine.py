"""Apply state transitions to Payment rows: the only code that writes ``Payment.state``.

Each call runs inside the caller's unit of work and does three things atomically:
check the edge against :mod:`connector.payments.states`, update the row with optimistic locking
(``WHERE version = :seen``), and append the matching event to the outbox. If another worker moved
the payment first, :class:`~connector.errors.ConcurrentUpdate` is raised and nothing is written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col

from connector.errors import ConcurrentUpdate
from connector.events.outbox import record_event
from connector.metrics import PAYMENT_TRANSITIONS
from connector.payments.states import EVENT_FOR_STATE, PaymentState, check_transition
from connector.payments.views import payment_snapshot
from connector.storage.models.payments import Payment

_IMMUTABLE = frozenset({"id", "state", "version", "connection_id", "direction", "created_at"})


def insert_payment(session: Session, payment: Payment, *, now: datetime | None = None) -> Payment:
    """Add a new payment in ``created`` and emit ``payment.created`` in the same transaction."""
    now = now or datetime.now(UTC)
    payment.state = PaymentState.CREATED.value
    payment.version = 1
    payment.created_at = payment.updated_at = now
    session.add(payment)
    session.flush()
    record_event(
        session,
        EVENT_FOR_STATE[PaymentState.CREATED],
        payment.connection_id,
        {"payment": payment_snapshot(payment)},
        payment_id=payment.id,
    )
    return payment


def transition(
    session: Session,
    payment: Payment,
    target: PaymentState,
    *,
    now: datetime | None = None,
    event_extra: dict[str, Any] | None = None,
    **changes: Any,
) -> Payment:
    """Move ``payment`` to ``target``, applying ``changes`` to other columns in the same write."""
    check_transition(payment.id, payment.state, target)
    bad = _IMMUTABLE.intersection(changes)
    if bad:
        raise ValueError(f"transition cannot change {sorted(bad)}")
    now = now or datetime.now(UTC)
    seen = payment.version
    values: dict[str, Any] = {
        "state": target.value,
        "version": seen + 1,
        "updated_at": now,
        **changes,
    }
    result = session.execute(
        update(Payment)
        .where(col(Payment.id) == payment.id, col(Payment.version) == seen)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConcurrentUpdate(
            f"payment {payment.id} changed concurrently (expected version {seen})",
            payment_id=payment.id,
        )
    for key, value in values.items():
        setattr(payment, key, value)
    PAYMENT_TRANSITIONS.labels(state=target.value, direction=payment.direction).inc()
    data: dict[str, Any] = {"payment": payment_snapshot(payment)}
    if event_extra:
        data.update(event_extra)
    record_event(
        session, EVENT_FOR_STATE[target], payment.connection_id, data, payment_id=payment.id
    )
    return payment


def update_fields(
    session: Session, payment: Payment, *, now: datetime | None = None, **changes: Any
) -> Payment:
    """Change non-state columns under the same optimistic lock (no event: nothing happened)."""
    bad = _IMMUTABLE.intersection(changes)
    if bad:
        raise ValueError(f"update_fields cannot change {sorted(bad)}")
    seen = payment.version
    values = {"version": seen + 1, "updated_at": now or datetime.now(UTC), **changes}
    result = session.execute(
        update(Payment)
        .where(col(Payment.id) == payment.id, col(Payment.version) == seen)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConcurrentUpdate(f"payment {payment.id} changed concurrently", payment_id=payment.id)
    for key, value in values.items():
        setattr(payment, key, value)
    return payment
