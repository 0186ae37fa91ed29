"""The audit log: who changed what, when, with secrets masked, in the same transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from connector.ids import new_id
from connector.storage.models.connections import AuditEntry


def audit(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> AuditEntry:
    """``before``/``after`` must already be public views (masked); nothing here decrypts."""
    entry = AuditEntry(
        id=new_id("aud"),
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
        request_id=request_id,
        at=datetime.now(UTC),
    )
    session.add(entry)
    return entry
