"""Outbox events, webhook subscriptions, deliveries and their attempts.

An Event row is written in the same transaction as the change it describes (the outbox). The
dispatcher later fans each event out into one Delivery per matching Subscription and sends it;
every send is recorded as a DeliveryAttempt so operators can see what happened.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from connector.storage.models.payments import _ts


class Event(SQLModel, table=True):
    """``sequence`` numbers a payment's events 1, 2, 3… in the order they were written (NULL for
    events about no payment); unique per payment, so a racing writer fails instead of
    duplicating a number. Receivers order and de-duplicate by it."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_dispatched", "dispatched", "id"),
        Index("uq_events_payment_sequence", "payment_id", "sequence", unique=True),
    )

    id: str = Field(primary_key=True, max_length=40)
    type: str = Field(max_length=64, index=True)
    connection_id: str | None = Field(default=None, max_length=40, index=True)
    payment_id: str | None = Field(default=None, max_length=40, index=True)
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    dispatched: bool = False
    sequence: int | None = None
    created_at: datetime = _ts()


class Subscription(SQLModel, table=True):
    """Where events go. ``is_default`` marks the one that mirrors a connection's webhookUrl."""

    __tablename__ = "subscriptions"

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str | None = Field(default=None, max_length=40, index=True)
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    secret_token: str = Field(max_length=4096)  # vault ciphertext of the whsec_ secret
    previous_secret_token: str | None = Field(default=None, max_length=4096)
    previous_secret_expires_at: datetime | None = _ts(nullable=True)
    is_default: bool = False
    status: str = Field(default="active", max_length=12)  # active | disabled
    disabled_reason: str | None = Field(default=None, max_length=512)
    failing_since: datetime | None = _ts(nullable=True)
    description: str | None = Field(default=None, max_length=256)
    created_by_key: str | None = Field(default=None, max_length=40)  # API key that subscribed
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "subscription_id", name="uq_delivery_event_subscription"),
        Index("ix_deliveries_due", "status", "next_attempt_at"),
        # A payment's deliveries to one subscription form a chain sent in sequence order; this
        # finds a delivery's unfinished predecessors (only unfinished rows are indexed).
        Index(
            "ix_deliveries_chain_open",
            "subscription_id",
            "payment_id",
            "sequence",
            postgresql_where=text("status IN ('pending', 'sending')"),
            sqlite_where=text("status IN ('pending', 'sending')"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    event_id: str = Field(max_length=40, index=True)
    subscription_id: str = Field(max_length=40, index=True)
    # Copied from the event at fan-out, so ordering checks need no join.
    payment_id: str | None = Field(default=None, max_length=40)
    sequence: int | None = None
    status: str = Field(default="pending", max_length=12)  # pending|sending|delivered|failed|dead
    attempts: int = 0
    next_attempt_at: datetime | None = _ts(nullable=True)
    lease_until: datetime | None = _ts(nullable=True)
    lease_owner: str | None = Field(default=None, max_length=32, index=True)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=1024)
    delivered_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "delivery_attempts"

    id: str = Field(primary_key=True, max_length=40)
    delivery_id: str = Field(max_length=40, index=True)
    attempt: int
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = Field(default=None, max_length=1024)
    response_excerpt: str | None = Field(default=None, max_length=1024)
    outcome: str = Field(max_length=16)  # delivered | retry | failed | gone
    created_at: datetime = _ts()
