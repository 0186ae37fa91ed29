"""The transactional outbox: events are rows written in the caller's transaction.

``record_event`` never commits. The event becomes visible exactly when the state change that
caused it commits, and disappears with it on rollback — so a crash can neither lose an event nor
announce a change that never happened. Delivery happens later (see ``connector.webhooks``).

Events about a payment get the payment's next ``sequence`` number (1, 2, 3…), computed by the
INSERT itself from the events already written, so numbering costs no extra round trip. A payment's
writers are serialized by the payment row's lock (every transition updates it first), and the
unique index on ``(payment_id, sequence)`` makes a writer that raced without that lock fail
rather than reuse a number. The stored ``payload`` is the delivered body without ``sequence``,
which lives in its own column: :func:`body_of` puts them together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, select
from sqlmodel import Session, SQLModel

from connector.events.catalogue import API_VERSION, EVENT_TYPES
from connector.events.notify import mark_pending
from connector.ids import new_id

EVENTS: Table = SQLModel.metadata.tables["events"]
_INSERT = insert(EVENTS)
_PRIOR = EVENTS.alias("prior")
# Evaluated per row: executed one row at a time (a single execute, or a DB-API executemany
# without RETURNING, which is how SQLAlchemy runs a list of parameters here), each row sees the
# rows inserted before it in this transaction, so one batch numbers a payment's events n, n+1…
# Were rows ever sent as one multi-VALUES statement, they would share a number and the unique
# index would refuse the batch: a loud failure, never a silent duplicate.
_NEXT_SEQUENCE = (
    select(func.coalesce(func.max(_PRIOR.c.sequence), 0) + 1)
    .where(_PRIOR.c.payment_id == bindparam("seq_payment_id"))
    .scalar_subquery()
)
_INSERT_SEQUENCED = insert(EVENTS).values(sequence=_NEXT_SEQUENCE)


def body_of(payload: dict[str, Any], sequence: int | None) -> dict[str, Any]:
    """The event as delivered and shown: the stored payload plus its ``sequence``."""
    return {**payload, "sequence": sequence}


def _build(
    type: str,
    connection_id: str | None,
    data: dict[str, Any],
    payment_id: str | None,
    now: datetime,
) -> dict[str, Any]:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}: add it to connector.events.catalogue")
    event_id = new_id("evt")
    payload = {
        "id": event_id,
        "type": type,
        "api_version": API_VERSION,
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "connection_id": connection_id,
        "data": data,
    }
    return {
        "id": event_id,
        "type": type,
        "connection_id": connection_id,
        "payment_id": payment_id,
        "payload": payload,
        "dispatched": False,
        "created_at": now,
    }


def record_event(
    session: Session,
    type: str,
    connection_id: str | None,
    data: dict[str, Any],
    *,
    payment_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Append one event to the outbox in the caller's transaction and return its payload.

    A plain INSERT rather than an ORM object: events are write-once rows that nothing in this
    transaction reads back, and skipping the identity map keeps a payment's hot path cheap.
    """
    row = _build(type, connection_id, data, payment_id, now or datetime.now(UTC))
    sequence: int | None = None
    if payment_id is None:
        session.execute(_INSERT, row)
    else:
        sequence = session.execute(
            _INSERT_SEQUENCED.returning(EVENTS.c.sequence), {**row, "seq_payment_id": payment_id}
        ).scalar_one()
    mark_pending(session)
    return body_of(row["payload"], sequence)


def build_rows(
    events: list[tuple[str, str | None, dict[str, Any], str | None]],
    *,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The outbox rows for ``events`` ``(type, connection_id, data, payment_id)``, in order and
    without ``sequence``: for a writer that inserts them inside a statement of its own
    (:mod:`connector.payments.machine`'s one-statement writes) rather than through
    :func:`record_events`."""
    now = now or datetime.now(UTC)
    return [_build(t, c, d, p, now) for t, c, d, p in events]


def record_events(
    session: Session,
    events: list[tuple[str, str | None, dict[str, Any], str | None]],
    *,
    now: datetime | None = None,
) -> None:
    """Append several events ``(type, connection_id, data, payment_id)`` in one statement, in
    order: their ids increase and a payment's events get consecutive sequence numbers, so they
    are delivered in this order."""
    if not events:
        return
    rows = build_rows(events, now=now)
    plain = [row for row in rows if row["payment_id"] is None]
    sequenced = [
        {**row, "seq_payment_id": row["payment_id"]}
        for row in rows
        if row["payment_id"] is not None
    ]
    if plain:
        session.execute(_INSERT, plain)
    if sequenced:
        session.execute(_INSERT_SEQUENCED, sequenced)
    mark_pending(session)
