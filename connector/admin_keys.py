"""Admin API keys: shown once, stored as SHA-256, prefixed, scoped, revocable.

A key looks like ``x402c_sk_<id tail>_<secret>``. Only its hash is stored; the visible
``prefix`` lets people recognize a key in lists and logs without revealing it. SHA-256 (not a slow
password hash) is right here because the key has 256 bits of entropy: there is nothing to guess.

Every key belongs to a *principal*: the person or operator identity accountable for it. A key
minted through the API inherits its minter's principal, so nobody can manufacture a second
identity with the keys they hold; only someone with operator access (the CLI, the bootstrap)
names a new principal. Four-eyes approvals count principals, not keys.

An ``actions`` key may be limited to a list of connections (``connection_ids``); an ``admin`` key
may always use every connection.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col

from connector.audit import audit
from connector.errors import NotFound, ValidationFailed
from connector.ids import new_id
from connector.storage.models.connections import AdminKey, Connection

SCOPES = ("admin", "read", "actions")
KEY_PREFIX = "x402c_sk_"
#: A principal names a person or operator identity: an e-mail address, a login, ``team:ops``.
PRINCIPAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+:/-]{0,119}$")
ALL_CONNECTIONS = "*"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _connection_scope(
    session: Session, scopes: list[str], connections: list[str] | None
) -> list[str] | None:
    """The stored ``connection_ids``: None means every connection."""
    if connections is None:
        return None
    if "admin" in scopes:
        raise ValidationFailed(
            "an admin key may use every connection; connections applies to actions keys",
            field="connections",
        )
    if "actions" not in scopes:
        raise ValidationFailed(
            "connections applies only to keys with the actions scope", field="connections"
        )
    if connections == [ALL_CONNECTIONS]:
        return None
    if not connections or ALL_CONNECTIONS in connections:
        raise ValidationFailed(
            'connections must list connection ids, or be ["*"] for every connection',
            field="connections",
        )
    wanted = sorted(set(connections))
    found = set(
        session.execute(
            select(col(Connection.id)).where(
                col(Connection.id).in_(wanted), col(Connection.deleted_at).is_(None)
            )
        ).scalars()
    )
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValidationFailed(f"unknown connections {missing[:5]}", field="connections")
    return wanted


def create_key(
    session: Session,
    *,
    name: str,
    scopes: list[str],
    actor: str = "cli",
    request_id: str | None = None,
    principal: str | None = None,
    created_by: AdminKey | None = None,
    connections: list[str] | None = None,
) -> tuple[AdminKey, str]:
    """Mint a key. ``created_by`` (the key that minted it, through the API) passes its principal
    on; without one, ``principal`` names it (CLI/bootstrap), defaulting to ``actor`` — so keys
    minted without an explicit identity all share one principal and can never count as two
    approvers. ``connections`` limits an actions key (None or ``["*"]``: every connection)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValidationFailed(f"scopes must be a non-empty subset of {SCOPES}", field="scopes")
    if created_by is not None:
        if principal is not None and principal != created_by.principal:
            raise ValidationFailed(
                "a key minted with another key inherits its principal; "
                "a new principal is created with the CLI (x402c admin-key create --principal)",
                field="principal",
            )
        principal = created_by.principal
    principal = principal if principal is not None else actor
    if not PRINCIPAL.match(principal):
        raise ValidationFailed(
            "principal must be 1-120 characters: letters, digits and . _ @ + : / -",
            field="principal",
        )
    connection_ids = _connection_scope(session, sorted(set(scopes)), connections)
    key_id = new_id("key")
    plaintext = f"{KEY_PREFIX}{key_id[-8:]}_{secrets.token_urlsafe(32)}"
    row = AdminKey(
        id=key_id,
        name=name,
        prefix=plaintext[: len(KEY_PREFIX) + 8],
        secret_hash=_hash(plaintext),
        scopes=sorted(set(scopes)),
        principal=principal,
        created_by=created_by.id if created_by is not None else actor,
        connection_ids=connection_ids,
    )
    session.add(row)
    audit(
        session,
        actor=actor,
        action="admin_key.create",
        target_type="admin_key",
        target_id=key_id,
        after={
            "name": name,
            "scopes": row.scopes,
            "prefix": row.prefix,
            "principal": principal,
            "connections": connection_ids,
        },
        request_id=request_id,
    )
    return row, plaintext


def authenticate(session: Session, presented: str) -> AdminKey | None:
    if not presented.startswith(KEY_PREFIX) or len(presented) > 200:
        return None
    prefix = presented[: len(KEY_PREFIX) + 8]
    digest = _hash(presented)
    for row in session.execute(select(AdminKey).where(col(AdminKey.prefix) == prefix)).scalars():
        if (
            isinstance(row, AdminKey)
            and row.revoked_at is None
            and hmac.compare_digest(row.secret_hash, digest)
        ):
            return row
    return None


#: ``last_used_at`` is a coarse "is this key still in use" signal: written at most this often per
#: key, so authenticated reads do not turn into writes (issue 13: every admin GET committed).
LAST_USED_RESOLUTION = timedelta(minutes=1)


def note_use(session: Session, key: AdminKey, now: datetime | None = None) -> bool:
    """Record that ``key`` was used, unless that was already recorded within the last minute.

    Returns whether a write was made. The UPDATE is conditional, so concurrent requests with the
    same key write once per minute between them, not once each; the caller commits."""
    now = now or datetime.now(UTC)
    last = key.last_used_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    if last is not None and now - last < LAST_USED_RESOLUTION:
        return False
    stale = now - LAST_USED_RESOLUTION
    result = session.execute(
        update(AdminKey)
        .where(
            col(AdminKey.id) == key.id,
            or_(col(AdminKey.last_used_at).is_(None), col(AdminKey.last_used_at) <= stale),
        )
        .values(last_used_at=now)
    )
    set_committed_value(key, "last_used_at", now)
    return bool(result.rowcount)  # type: ignore[attr-defined]


def has_scope(key: AdminKey, needed: str) -> bool:
    return "admin" in key.scopes or needed in key.scopes


def may_use(key: AdminKey, connection_id: str | None) -> bool:
    """Whether ``key`` may act on (and read the jobs of) ``connection_id``."""
    if "admin" in key.scopes or key.connection_ids is None:
        return True
    return connection_id is not None and connection_id in key.connection_ids


def revoke(session: Session, key_id: str, *, actor: str, request_id: str | None = None) -> AdminKey:
    row = session.get(AdminKey, key_id)
    if row is None:
        raise NotFound(f"admin key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        session.add(row)
        audit(
            session,
            actor=actor,
            action="admin_key.revoke",
            target_type="admin_key",
            target_id=key_id,
            request_id=request_id,
        )
    return row
