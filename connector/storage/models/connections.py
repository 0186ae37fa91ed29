"""Connections (a customer's x402 credentials), archived wallets, admin keys, the audit log.

Secret columns end in ``_token``: they hold vault ciphertexts bound to (row id, field), never
plaintext. Public companions (``api_key_hint``, ``wallet_address``) are what reads may show.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from connector.storage.models.payments import _ts


class Connection(SQLModel, table=True):
    __tablename__ = "connections"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=120)
    network: str = Field(max_length=64)  # CAIP-2
    rpc_url: str = Field(max_length=2048)
    facilitator_url: str = Field(max_length=2048)
    asset: str | None = Field(default=None, max_length=42)  # default token; None = network USDC
    api_key_token: str | None = Field(default=None, max_length=4096)
    api_key_hint: str | None = Field(default=None, max_length=16)
    # Set: the API key is a JWT signing secret for this key id (CDP-style facilitator auth).
    api_key_id: str | None = Field(default=None, max_length=256)
    webhook_url: str | None = Field(default=None, max_length=2048)
    webhook_secret_token: str = Field(max_length=4096)
    previous_webhook_secret_token: str | None = Field(default=None, max_length=4096)
    previous_webhook_secret_expires_at: datetime | None = _ts(nullable=True)
    # Both None on a receive-only connection (it has a ``pay_to`` address and no key).
    wallet_key_token: str | None = Field(default=None, max_length=4096)
    wallet_address: str | None = Field(default=None, max_length=42, index=True)
    pay_to: str | None = Field(default=None, max_length=42)  # receiving address; None = wallet
    capture_default: str = Field(default="automatic", max_length=12)
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    deleted_at: datetime | None = _ts(nullable=True)
    version: int = 1


class WalletKey(SQLModel, table=True):
    """Every wallet a connection ever had; rotated-out keys are archived, never deleted, because
    refunds of old payments and audits may still need them."""

    __tablename__ = "wallet_keys"

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str = Field(max_length=40, index=True)
    address: str = Field(max_length=42)
    key_token: str = Field(max_length=4096)
    status: str = Field(default="active", max_length=12)  # active | archived
    created_at: datetime = _ts()
    archived_at: datetime | None = _ts(nullable=True)


class AdminKey(SQLModel, table=True):
    __tablename__ = "admin_keys"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=120)
    prefix: str = Field(max_length=24, index=True)  # shown in lists to recognize a key
    secret_hash: str = Field(max_length=64)  # sha256 hex of the full key
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The person or operator identity accountable for this key. A key minted through the API
    # inherits its minter's principal; only the CLI/bootstrap names a new one. Approvals count
    # distinct principals, not keys.
    principal: str = Field(default="operator", max_length=120)
    created_by: str | None = Field(default=None, max_length=40)  # minting key id, or cli/system
    # Connections an ``actions`` key may use (None: every connection; admin keys always all).
    connection_ids: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _ts()
    last_used_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_target", "target_type", "target_id"),)

    id: str = Field(primary_key=True, max_length=40)
    actor: str = Field(max_length=40, index=True)  # admin key id, or "system"/"cli"
    action: str = Field(max_length=64, index=True)
    target_type: str = Field(max_length=32)
    target_id: str | None = Field(default=None, max_length=40)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    request_id: str | None = Field(default=None, max_length=64)
    at: datetime = _ts()
