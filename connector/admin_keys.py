"""Admin API keys: shown once, stored as SHA-256, prefixed, scoped, revocable.

A key looks like ``x402c_sk_<id tail>_<secret>``. Only its hash is stored; the visible
``prefix`` lets people recognize a key in lists and logs without revealing it. SHA-256 (not a slow
password hash) is right here because the key has 256 bits of entropy: there is nothing to guess.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from sqlalchemy import select
from sqlmodel import Session, col

from connector.audit import audit
from connector.errors import NotFound, ValidationFailed
from connector.ids import new_id
from connector.storage.models.connections import AdminKey

SCOPES = ("admin", "read", "actions")
KEY_PREFIX = "x402c_sk_"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    session: Session,
    *,
    name: str,
    scopes: list[str],
    actor: str = "cli",
    request_id: str | None = None,
) -> tuple[AdminKey, str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValidationFailed(f"scopes must be a non-empty subset of {SCOPES}", field="scopes")
    key_id = new_id("key")
    plaintext = f"{KEY_PREFIX}{key_id[-8:]}_{secrets.token_urlsafe(32)}"
    row = AdminKey(
        id=key_id,
        name=name,
        prefix=plaintext[: len(KEY_PREFIX) + 8],
        secret_hash=_hash(plaintext),
        scopes=sorted(set(scopes)),
    )
    session.add(row)
    audit(
        session,
        actor=actor,
        action="admin_key.create",
        target_type="admin_key",
        target_id=key_id,
        after={"name": name, "scopes": row.scopes, "prefix": row.prefix},
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


def has_scope(key: AdminKey, needed: str) -> bool:
    return "admin" in key.scopes or needed in key.scopes


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
