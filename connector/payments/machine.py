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
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    Row,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    cast,
    func,
    insert,
    inspect,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, SQLModel

from connector.actions import outcome
from connector.errors import ConcurrentUpdate
from connector.events.notify import events_committed
from connector.events.outbox import EVENTS, build_rows, record_events
from connector.metrics import PAYMENT_TRANSITIONS
from connector.payments.states import EVENT_FOR_STATE, PaymentState, check_transition
from connector.payments.views import payment_snapshot
from connector.storage import db
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
    Jobs waiting on the payment (approval, unknown outcome), and finished jobs that reported it
    when a reorganization or a late settlement contradicts them, are brought up to date in the
    same transaction (:func:`connector.actions.outcome.follow_payment`, the one place that does
    it); ``follow_jobs=False`` is for a caller that records its own job's outcome itself.
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
    if follow_jobs and outcome.may_have_job(payment, str(before["state"])):
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


# ------------------------------------------------------------------ one statement (PostgreSQL)
#
# PostgreSQL runs data-modifying WITH clauses, so a payment row, its events and a guard can be
# written by a single statement; in autocommit mode that statement is its own transaction. A
# paid paywall hit writes twice (recording the payment with its claim, then its settlement):
# done through a session, each is BEGIN, one round trip per statement and COMMIT; done here,
# each is one round trip, with the same atomicity (the statement commits as a whole or not at
# all), the same edge checks, versions, events and sequence numbers. SQLite has no
# data-modifying WITH: callers use the session functions above there, and on a connection
# pinned by ``db.one_connection`` (a job's), whose transactions they share.

_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]
_PAYMENT_NAMES = [column.name for column in PAYMENTS.c]
_EVENT_NAMES = [column.name for column in EVENTS.c]
#: The events of one write, as one JSON array of outbox rows, read back as rows of the events
#: table's own type (one parameter however many events: the statement's text and parameter
#: count stay small enough for the driver to cache its parsing).
_EVENT_ROWS = (
    func.json_populate_recordset(
        literal_column(f"NULL::{EVENTS.name}"), bindparam("events", type_=JSON)
    )
    .table_valued(*_EVENT_NAMES)
    .alias("new_event")
)


def writes_alone(engine: Engine) -> bool:
    """Whether :func:`insert_payment_guarded` and :func:`advance_alone` apply on ``engine``."""
    return engine.dialect.name == "postgresql" and not db.pinned(engine)


def _typed(table: Table, prefix: str, names: list[str]) -> list[ColumnElement[Any]]:
    """Bound values for ``INSERT … SELECT``: a SELECT list gives the server no column to infer a
    parameter's type from (a NULL would be text), so each is cast to its column's type. Text
    columns are cast to unbounded text: a cast to ``varchar(n)`` would truncate silently where
    the INSERT refuses a value that is too long."""
    out: list[ColumnElement[Any]] = []
    for name in names:
        type_ = table.c[name].type
        stored = type_.dialect_impl(_POSTGRESQL)
        stored = getattr(stored, "impl_instance", stored)  # a decorated type's stored type
        target = Text() if isinstance(stored, String) else type_
        out.append(cast(bindparam(prefix + name, type_=type_), target))
    return out


def _event_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outbox rows as JSON for :data:`_EVENT_ROWS`, ``sequence`` counting 1, 2, … (an offset
    from the payment's last event where it has some)."""
    return [
        {**row, "created_at": row["created_at"].isoformat(), "sequence": i}
        for i, row in enumerate(rows, start=1)
    ]


def _insert_events(after: Any, sequence: ColumnElement[Any]) -> Any:
    """``INSERT INTO events … SELECT <the JSON rows> FROM <after>``: nothing if ``after`` (a
    data-modifying CTE) returned no row."""
    values = [_EVENT_ROWS.c[name] for name in _EVENT_NAMES if name != "sequence"]
    return insert(EVENTS).from_select(
        [*(name for name in _EVENT_NAMES if name != "sequence"), "sequence"],
        select(*values, sequence).select_from(after.join(_EVENT_ROWS, true())),
    )


@cache
def _guarded_insert(guard: Update) -> Select[Any]:
    """``WITH guard AS (<guard> RETURNING …), pay AS (INSERT payment … FROM guard RETURNING id),
    event AS (INSERT events … FROM pay) SELECT * FROM guard``: nothing is inserted unless the
    guard updated a row; the new payment's events are numbered 1, 2, …"""
    guarded = guard.cte("guard")
    pay = (
        insert(PAYMENTS)
        .from_select(
            _PAYMENT_NAMES, select(*_typed(PAYMENTS, "p_", _PAYMENT_NAMES)).select_from(guarded)
        )
        .returning(PAYMENTS.c.id)
        .cte("pay")
    )
    events = _insert_events(pay, _EVENT_ROWS.c.sequence).cte("event")
    return select(*guarded.c).add_cte(pay, events)


def insert_payment_guarded(
    engine: Engine,
    payment: Payment,
    guard: Update,
    guard_params: dict[str, Any],
    *,
    now: datetime | None = None,
    then: Sequence[Step] = (),
) -> Row[Any] | None:
    """:func:`insert_payment` made conditional on ``guard`` (an ``UPDATE … RETURNING`` built
    once by the caller, e.g. a paywall's slot claim), in one statement that is its own
    transaction: the guard runs first and the payment with its events is written only if it
    updated a row. Returns the guard's row, or None (nothing written). A duplicate payment
    raises :class:`~sqlalchemy.exc.IntegrityError` and writes nothing, the guard included.
    PostgreSQL only (:func:`writes_alone`)."""
    now = now or datetime.now(UTC)
    payment.state = PaymentState.CREATED.value
    payment.version = 1
    payment.created_at = payment.updated_at = now
    created = (EVENT_FOR_STATE[PaymentState.CREATED], {"payment": payment_snapshot(payment)})
    PAYMENT_TRANSITIONS.labels(state=payment.state, direction=payment.direction).inc()
    _, later = _walk(payment, then, now)
    rows = build_rows(
        [(type_, payment.connection_id, data, payment.id) for type_, data in [created, *later]],
        now=now,
    )
    params = {
        **guard_params,
        **{"p_" + name: value for name, value in _row_values(payment).items()},
        "events": _event_rows(rows),
    }
    with db.autocommit(engine) as conn:
        found = conn.execute(_guarded_insert(guard), params).one_or_none()
    if found is not None:
        events_committed()
    return found


@cache
def _update_with_events(columns: tuple[str, ...]) -> Select[Any]:
    """``WITH moved AS (UPDATE payment … WHERE id AND version RETURNING id), event AS (INSERT
    events … FROM moved) SELECT count(*) FROM moved``: the events are written only if the
    versioned update matched, numbered after the payment's last event."""
    moved = (
        update(PAYMENTS)
        .where(PAYMENTS.c.id == bindparam("b_id"), PAYMENTS.c.version == bindparam("b_seen"))
        .values({name: bindparam("v_" + name, type_=PAYMENTS.c[name].type) for name in columns})
        .returning(PAYMENTS.c.id)
        .cte("moved")
    )
    prior = EVENTS.alias("prior")
    last = (
        select(func.coalesce(func.max(prior.c.sequence), 0))
        .where(prior.c.payment_id == bindparam("b_id"))
        .scalar_subquery()
    )
    events = _insert_events(moved, last + _EVENT_ROWS.c.sequence).cte("event")
    return select(func.count()).select_from(moved).add_cte(events)


def advance_alone(
    engine: Engine, payment: Payment, steps: Sequence[Step], *, now: datetime | None = None
) -> bool:
    """:func:`advance` as its own transaction, in one statement (PostgreSQL only, see
    :func:`writes_alone`). Raises :class:`~connector.errors.ConcurrentUpdate` (nothing written,
    ``payment`` unchanged) if the payment moved meanwhile. Returns False, writing nothing and
    leaving ``payment`` unchanged, when a job may follow the payment: :func:`advance` in
    a unit of work brings such jobs along in the same transaction."""
    if not steps:
        return True
    now = now or datetime.now(UTC)
    seen = payment.version
    touched = {"state", "version", "updated_at"}.union(*(step.changes for step in steps))
    before = {key: getattr(payment, key) for key in touched}
    try:
        values, events = _walk(payment, steps, now)
    except Exception:
        _apply(payment, before)
        raise
    if outcome.may_have_job(payment, str(before["state"])):
        _apply(payment, before)
        return False
    columns = _columns(values)
    rows = build_rows(
        [(type_, payment.connection_id, data, payment.id) for type_, data in events], now=now
    )
    params = {
        "b_id": payment.id,
        "b_seen": seen,
        **{"v_" + name: value for name, value in columns.items()},
        "events": _event_rows(rows),
    }
    with db.autocommit(engine) as conn:
        moved = conn.execute(_update_with_events(tuple(sorted(columns))), params).scalar_one()
    if moved != 1:
        _apply(payment, before)
        raise ConcurrentUpdate(
            f"payment {payment.id} changed concurrently (expected version {seen})",
            payment_id=payment.id,
        )
    events_committed()
    return True
