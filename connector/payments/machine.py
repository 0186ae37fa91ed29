"""Apply state transitions to Payment rows: the only code that writes ``Payment.state``.

Each call runs inside the caller's unit of work and does three things atomically:
check the edge against :mod:`connector.payments.states`, update the row with optimistic locking
(``WHERE version = :seen``), and append the matching event to the outbox. If another worker moved
the payment first, :class:`~connector.errors.ConcurrentUpdate` is raised and nothing is written.

Writes are plain Core statements on the table, not ORM flushes: a payment's hot path is a handful
of round trips, and the ORM's bookkeeping cost more CPU than the database work itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, inspect, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, SQLModel

from connector.actions import outcome
from connector.errors import ConcurrentUpdate
from connector.events.outbox import record_events
from connector.metrics import PAYMENT_TRANSITIONS
from connector.payments.states import EVENT_FOR_STATE, PaymentState, check_transition
from connector.payments.views import payment_snapshot
from connector.storage.models.payments import Payment

_IMMUTABLE = frozenset({"id", "state", "version", "connection_id", "direction", "created_at"})
# (attribute name, column name) of every Payment column, e.g. ("metadata_", "metadata").
PAYMENTS: Table = SQLModel.metadata.tables["payments"]
_COLUMNS = [(attr.key, attr.columns[0].name) for attr in inspect(Payment).column_attrs]
_COLUMN_OF = dict(_COLUMNS)
# Statements built once: the SET list of the versioned UPDATE comes from the parameters given
# at execution, so SQLAlchemy compiles each shape once and only binds values afterwards.
_INSERT = insert(PAYMENTS)
_UPDATE = update(PAYMENTS).where(
    PAYMENTS.c.id == bindparam("b_id"), PAYMENTS.c.version == bindparam("b_seen")
)


def _row_values(payment: Payment) -> dict[str, Any]:
    return {column: getattr(payment, key) for key, column in _COLUMNS}


def _apply(payment: Payment, values: dict[str, Any]) -> None:
    # The row was already written by our own UPDATE: record the values as the loaded state, so
    # the ORM does not see a change and issue a second, unversioned UPDATE at flush.
    for key, value in values.items():
        set_committed_value(payment, key, value)


@dataclass(frozen=True)
class Step:
    """One edge to take: the target state, the columns that change with it, extra event data."""

    target: PaymentState
    changes: dict[str, Any] = field(default_factory=dict)
    event_extra: dict[str, Any] | None = None


def _walk(
    payment: Payment, steps: Sequence[Step], now: datetime
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Apply ``steps`` in memory, checking every edge; return the written values and the events.

    Each step bumps the version and gets its own event carrying the snapshot *after that step*,
    exactly as if the steps had been separate transitions.
    """
    values: dict[str, Any] = {}
    events: list[tuple[str, dict[str, Any]]] = []
    for step in steps:
        check_transition(payment.id, payment.state, step.target)
        bad = _IMMUTABLE.intersection(step.changes)
        if bad:
            raise ValueError(f"transition cannot change {sorted(bad)}")
        delta = {
            "state": step.target.value,
            "version": payment.version + 1,
            "updated_at": now,
            **step.changes,
        }
        _apply(payment, delta)
        values.update(delta)
        data: dict[str, Any] = {"payment": payment_snapshot(payment)}
        if step.event_extra:
            data.update(step.event_extra)
        events.append((EVENT_FOR_STATE[step.target], data))
        PAYMENT_TRANSITIONS.labels(state=step.target.value, direction=payment.direction).inc()
    return values, events


def _record(session: Session, payment: Payment, events: list[tuple[str, dict[str, Any]]]) -> None:
    record_events(
        session,
        [(type_, payment.connection_id, data, payment.id) for type_, data in events],
    )


def insert_payment(
    session: Session,
    payment: Payment,
    *,
    now: datetime | None = None,
    then: Sequence[Step] = (),
) -> Payment:
    """Add a new payment in ``created`` (event ``payment.created``), optionally taking the
    ``then`` steps in the same transaction.

    A payment that is decided, signed and handed to settlement in one go is written as one row
    with one event per state it passed through: the same history and the same atomicity as
    separate transitions, at a fraction of the round trips.
    """
    now = now or datetime.now(UTC)
    payment.state = PaymentState.CREATED.value
    payment.version = 1
    payment.created_at = payment.updated_at = now
    created = (EVENT_FOR_STATE[PaymentState.CREATED], {"payment": payment_snapshot(payment)})
    PAYMENT_TRANSITIONS.labels(state=payment.state, direction=payment.direction).inc()
    _, later = _walk(payment, then, now)
    session.execute(_INSERT, _row_values(payment))
    _record(session, payment, [created, *later])
    return payment


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    return {_COLUMN_OF.get(key, key): value for key, value in values.items()}


def advance(
    session: Session,
    payment: Payment,
    steps: Sequence[Step],
    *,
    now: datetime | None = None,
    follow_jobs: bool = True,
) -> Payment:
    """Take ``steps`` on a stored payment: one versioned UPDATE, one event per step.

    If another worker moved the payment first, nothing is written and
    :class:`~connector.errors.ConcurrentUpdate` is raised; ``payment`` is left unchanged.
    Jobs waiting on the payment (approval, unknown outcome) are brought up to date in the same
    transaction; ``follow_jobs=False`` is for a caller that records its own job's outcome itself.
    """
    if not steps:
        return payment
    seen = payment.version
    touched = {"state", "version", "updated_at"}.union(*(step.changes for step in steps))
    before = {key: getattr(payment, key) for key in touched}
    try:
        values, events = _walk(payment, steps, now or datetime.now(UTC))
    except Exception:
        _apply(payment, before)
        raise
    result = session.execute(_UPDATE, {**_columns(values), "b_id": payment.id, "b_seen": seen})
    if result.rowcount != 1:  # type: ignore[attr-defined]
        _apply(payment, before)
        raise ConcurrentUpdate(
            f"payment {payment.id} changed concurrently (expected version {seen})",
            payment_id=payment.id,
        )
    _record(session, payment, events)
    if follow_jobs and outcome.may_have_waiting_job(payment, str(before["state"])):
        outcome.follow_payment(session, payment)
    return payment


def transition(
    session: Session,
    payment: Payment,
    target: PaymentState,
    *,
    now: datetime | None = None,
    event_extra: dict[str, Any] | None = None,
    follow_jobs: bool = True,
    **changes: Any,
) -> Payment:
    """Move ``payment`` to ``target``, applying ``changes`` to other columns in the same write."""
    return advance(
        session, payment, [Step(target, changes, event_extra)], now=now, follow_jobs=follow_jobs
    )


def update_fields(
    session: Session, payment: Payment, *, now: datetime | None = None, **changes: Any
) -> Payment:
    """Change non-state columns under the same optimistic lock (no event: nothing happened)."""
    bad = _IMMUTABLE.intersection(changes)
    if bad:
        raise ValueError(f"update_fields cannot change {sorted(bad)}")
    seen = payment.version
    values = {"version": seen + 1, "updated_at": now or datetime.now(UTC), **changes}
    result = session.execute(_UPDATE, {**_columns(values), "b_id": payment.id, "b_seen": seen})
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConcurrentUpdate(f"payment {payment.id} changed concurrently", payment_id=payment.id)
    _apply(payment, values)
    return payment
