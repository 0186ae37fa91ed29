"""The transactional outbox: events are rows written in the caller's transaction.

``record_event`` never commits. The event becomes visible exactly when the state change that
caused it commits, and disappears with it on rollback — so a crash can neither lose an event nor
announce a change that never happened. Delivery happens later (see ``connector.webhooks``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert
from sqlmodel import Session, SQLModel

from connector.events.catalogue import API_VERSION, EVENT_TYPES
from connector.events.notify import mark_pending
from connector.ids import new_id

EVENTS: Table = SQLModel.metadata.tables["events"]
_INSERT = insert(EVENTS)


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
    session.execute(_INSERT, row)
    mark_pending(session)
    return dict(row["payload"])


def record_events(
    session: Session,
    events: list[tuple[str, str | None, dict[str, Any], str | None]],
    *,
    now: datetime | None = None,
) -> None:
    """Append several events ``(type, connection_id, data, payment_id)`` in one statement, in
    order (their ids increase, so they are delivered in this order)."""
    if not events:
        return
    now = now or datetime.now(UTC)
    rows = [_build(t, c, d, p, now) for t, c, d, p in events]
    session.execute(_INSERT, rows)
    mark_pending(session)
