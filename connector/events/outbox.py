"""The transactional outbox: events are rows written in the caller's transaction.

``record_event`` never commits. The event becomes visible exactly when the state change that
caused it commits, and disappears with it on rollback — so a crash can neither lose an event nor
announce a change that never happened. Delivery happens later (see ``connector.webhooks``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from connector.events.catalogue import API_VERSION, EVENT_TYPES
from connector.events.notify import mark_pending
from connector.ids import new_id
from connector.storage.models.events import Event


def record_event(
    session: Session,
    type: str,
    connection_id: str | None,
    data: dict[str, Any],
    *,
    payment_id: str | None = None,
    now: datetime | None = None,
) -> Event:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}: add it to connector.events.catalogue")
    now = now or datetime.now(UTC)
    event_id = new_id("evt")
    event = Event(
        id=event_id,
        type=type,
        connection_id=connection_id,
        payment_id=payment_id,
        payload={
            "id": event_id,
            "type": type,
            "api_version": API_VERSION,
            "created_at": now.isoformat().replace("+00:00", "Z"),
            "connection_id": connection_id,
            "data": data,
        },
        created_at=now,
    )
    session.add(event)
    mark_pending(session)
    return event
