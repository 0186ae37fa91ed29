"""Webhook subscriptions: extra endpoints (REST hooks, admin) and each connection's default.

A connection's ``webhookUrl`` is represented by a default subscription row (``is_default``)
created on first use; its URL and secrets are read from the connection at send time, so editing
the connection or rotating its secret takes effect at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from connector.errors import NotFound, ValidationFailed
from connector.events.catalogue import EVENT_TYPES
from connector.ids import new_id
from connector.net.ssrf import OutboundPolicy, check_url
from connector.storage.models.events import Subscription
from connector.vault import Vault
from connector.webhooks.signing import generate_secret

SECRET, PREVIOUS_SECRET = "secret", "previous_secret"


def view(sub: Subscription, session: Session | None = None) -> dict[str, Any]:
    """The public view; with a ``session``, a default subscription shows its connection's URL
    (the row itself stores none: the URL is read from the connection at send time)."""
    url: str | None = sub.url
    if sub.is_default and session is not None and sub.connection_id:
        from connector.storage.models.connections import Connection

        conn = session.get(Connection, sub.connection_id)
        url = conn.webhook_url if conn is not None else None
    return {
        "id": sub.id,
        "object": "subscription",
        "connection_id": sub.connection_id,
        "url": url or None,
        "event_types": sub.event_types,
        "is_default": sub.is_default,
        "status": sub.status,
        "disabled_reason": sub.disabled_reason,
        "failing_since": sub.failing_since.isoformat() if sub.failing_since else None,
        "description": sub.description,
        "created_at": sub.created_at.isoformat(),
    }


def _validate(
    url: str, event_types: list[str], allow_loopback: bool, policy: OutboundPolicy | None
) -> None:
    try:
        if policy is not None:
            policy.check_url(url)
        else:
            check_url(url, allow_loopback=allow_loopback)
    except ValidationFailed:
        raise
    except Exception as exc:
        raise ValidationFailed(str(getattr(exc, "detail", exc)), field="url") from exc
    unknown = sorted(set(event_types) - set(EVENT_TYPES))
    if unknown:
        raise ValidationFailed(f"unknown event types {unknown}", field="event_types")


def create(
    session: Session,
    vault: Vault,
    *,
    connection_id: str | None,
    url: str,
    event_types: list[str],
    description: str | None = None,
    allow_loopback: bool = False,
    policy: OutboundPolicy | None = None,
    created_by_key: str | None = None,
) -> tuple[Subscription, str]:
    """``policy`` is the runtime's SSRF policy (the same rules as delivery); ``created_by_key``
    records which API key made it, so a non-admin key can later delete only its own."""
    _validate(url, event_types, allow_loopback, policy)
    sub_id = new_id("sub")
    secret = generate_secret()
    sub = Subscription(
        id=sub_id,
        connection_id=connection_id,
        url=url,
        event_types=sorted(set(event_types)),
        secret_token=vault.encrypt(secret, owner=sub_id, field=SECRET),
        description=description,
        created_by_key=created_by_key,
    )
    session.add(sub)
    session.flush()
    return sub, secret


def get(session: Session, subscription_id: str) -> Subscription:
    sub = session.get(Subscription, subscription_id)
    if sub is None:
        raise NotFound(f"subscription {subscription_id} not found")
    return sub


def remove(session: Session, subscription_id: str) -> Subscription:
    sub = get(session, subscription_id)
    if sub.is_default:
        raise ValidationFailed(
            "the default subscription follows the connection's webhookUrl; change that instead",
            field="subscription_id",
        )
    sub.status = "deleted"
    sub.updated_at = datetime.now(UTC)
    session.add(sub)
    return sub


def default_id(connection_id: str) -> str:
    """The default subscription's id is derived from the connection's, so concurrent
    dispatchers creating it at once collide on the primary key instead of making two."""
    return "sub_" + connection_id.partition("_")[2]


def default_for(session: Session, connection_id: str) -> Subscription:
    sub_id = default_id(connection_id)
    found = session.get(Subscription, sub_id)
    if found is not None:
        return found
    sub = Subscription(
        id=sub_id,
        connection_id=connection_id,
        url="",
        event_types=[],
        secret_token="",
        is_default=True,
        description="connection webhookUrl",
    )
    try:
        with session.begin_nested():
            session.add(sub)
    except IntegrityError:
        existing = session.get(Subscription, sub_id)
        assert existing is not None
        return existing
    return sub


def rotate_secret(
    session: Session, vault: Vault, subscription_id: str, overlap: timedelta
) -> tuple[Subscription, str]:
    sub = get(session, subscription_id)
    if sub.is_default:
        raise ValidationFailed(
            "rotate the connection's webhook secret for its default subscription",
            field="subscription_id",
        )
    old = vault.decrypt(sub.secret_token, owner=sub.id, field=SECRET)
    fresh = generate_secret()
    sub.previous_secret_token = vault.encrypt(old, owner=sub.id, field=PREVIOUS_SECRET)
    sub.previous_secret_expires_at = datetime.now(UTC) + overlap
    sub.secret_token = vault.encrypt(fresh, owner=sub.id, field=SECRET)
    sub.updated_at = datetime.now(UTC)
    session.add(sub)
    return sub, fresh


def secrets_of(vault: Vault, sub: Subscription, now: datetime) -> list[str]:
    out = [vault.decrypt(sub.secret_token, owner=sub.id, field=SECRET)]
    expires = sub.previous_secret_expires_at
    if sub.previous_secret_token and expires and expires > now:
        out.append(vault.decrypt(sub.previous_secret_token, owner=sub.id, field=PREVIOUS_SECRET))
    return out


def reenable(session: Session, subscription_id: str) -> Subscription:
    sub = get(session, subscription_id)
    sub.status = "active"
    sub.disabled_reason = None
    sub.failing_since = None
    sub.updated_at = datetime.now(UTC)
    session.add(sub)
    return sub


def matches(sub: Subscription, event_type: str) -> bool:
    return sub.status == "active" and (not sub.event_types or event_type in sub.event_types)
