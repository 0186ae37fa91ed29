"""Tables of the payment side: payments, payment requests (paywalls), refunds, budget
reservations, approvals, and action jobs with their idempotency records.

Amounts use :class:`~connector.storage.types.Uint256` so they stay exact integers everywhere.
``version`` columns implement optimistic locking: every update says ``WHERE version = :seen`` and
bumps it, so two workers can never both apply a transition to the same payment.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from connector.storage.types import Uint256, UTCDateTime


def utcnow() -> datetime:
    return datetime.now(UTC)


def _money(nullable: bool = False) -> Any:
    return Field(sa_column=Column(Uint256(), nullable=nullable))


def _ts(nullable: bool = False, index: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True, index=index))
    return Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False, index=index)
    )


def _json() -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=True))


class Payment(SQLModel, table=True):
    __tablename__ = "payments"
    __table_args__ = (
        # One EIP-3009 authorization can pay at most one payment row: the database refuses a
        # second row carrying the same (asset, payer, nonce), which is what makes a replayed
        # X-PAYMENT header harmless even before the chain would reject it.
        # (Per direction: one database may hold both the payer's and the payee's record of the
        # same authorization when both agents are connections of this connector.)
        UniqueConstraint(
            "direction", "network", "asset", "payer", "nonce", name="uq_payments_authorization"
        ),
        UniqueConstraint(
            "connection_id", "direction", "idempotency_key", name="uq_payments_idempotency"
        ),
        Index("ix_payments_conn_state", "connection_id", "state"),
        Index("ix_payments_state_updated", "state", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str = Field(index=True, max_length=40)
    direction: str = Field(max_length=8)  # "outgoing" (send) | "incoming" (receive)
    state: str = Field(max_length=24)
    amount: int = _money()
    asset: str = Field(max_length=42)
    network: str = Field(max_length=64)
    payer: str | None = Field(default=None, max_length=42)
    payee: str = Field(max_length=42)
    scheme: str = Field(default="exact", max_length=32)
    x402_version: int | None = None
    resource_url: str | None = Field(default=None, max_length=2048)
    description: str | None = Field(default=None, max_length=1024)
    payment_request_id: str | None = Field(default=None, index=True, max_length=40)
    capture: str = Field(default="automatic", max_length=12)  # automatic | manual
    custodial: bool = False
    beneficiary: str | None = Field(default=None, max_length=42)
    nonce: str | None = Field(default=None, max_length=66)
    valid_before: datetime | None = _ts(nullable=True)
    hold_expires_at: datetime | None = _ts(nullable=True, index=True)
    hold_warning_sent: bool = False
    requirement: dict[str, Any] | None = _json()
    signed_payload: dict[str, Any] | None = _json()
    tx_hash: str | None = Field(default=None, max_length=66)
    settle_attempts: int = 0
    release_tx_hash: str | None = Field(default=None, max_length=66)
    # Custodial escrow: the escrow's signed transfer to the beneficiary, stored before use.
    release_payload: dict[str, Any] | None = _json()
    refunded_amount: int = Field(default=0, sa_column=Column(Uint256(), nullable=False))
    # On-chain escrow (authCapture): how much reached the receiver so far, and the escrow's
    # ledger of this payment as last read from the chain (see payments/escrow_ledger.py).
    captured_amount: int = Field(default=0, sa_column=Column(Uint256(), nullable=False))
    escrow: dict[str, Any] | None = _json()
    failure_code: str | None = Field(default=None, max_length=64)
    failure_reason: str | None = Field(default=None, max_length=1024)
    idempotency_key: str | None = Field(default=None, max_length=255)
    dry_run: bool = False
    approvals_required: int = 0
    response: dict[str, Any] | None = _json()
    metadata_: dict[str, Any] | None = Field(
        default=None, sa_column=Column("metadata", JSON, nullable=True)
    )
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    version: int = 1


class PaymentRequest(SQLModel, table=True):
    """A paywall offer made by ``receive``: what a payer must pay to get the resource."""

    __tablename__ = "payment_requests"

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str = Field(index=True, max_length=40)
    amount: int = _money()
    asset: str = Field(max_length=42)
    network: str = Field(max_length=64)
    pay_to: str = Field(max_length=42)
    token_name: str = Field(max_length=64)
    token_version: str = Field(max_length=16)
    description: str = Field(default="", max_length=1024)
    mime_type: str = Field(default="application/json", max_length=128)
    resource: dict[str, Any] | None = _json()  # content delivered after payment
    redirect_url: str | None = Field(default=None, max_length=2048)
    max_timeout_seconds: int = 300
    capture: str = Field(default="automatic", max_length=12)
    custodial: bool = False
    beneficiary: str | None = Field(default=None, max_length=42)
    max_payments: int = 1
    paid_count: int = 0
    # Which x402 versions the paywall offers: "both" | "v1" | "v2".
    protocols: str = Field(
        default="both", max_length=8, sa_column_kwargs={"server_default": "both"}
    )
    # "exact" (EIP-3009 transfer) or "authCapture" (on-chain escrow; terms in escrow_terms).
    scheme: str = Field(
        default="exact", max_length=32, sa_column_kwargs={"server_default": "exact"}
    )
    escrow_terms: dict[str, Any] | None = _json()
    status: str = Field(default="open", max_length=12)  # open | closed | expired
    expires_at: datetime | None = _ts(nullable=True)
    created_at: datetime = _ts()
    version: int = 1


class Refund(SQLModel, table=True):
    __tablename__ = "refunds"
    __table_args__ = (UniqueConstraint("payment_id", "idempotency_key", name="uq_refunds_key"),)

    id: str = Field(primary_key=True, max_length=40)
    payment_id: str = Field(index=True, max_length=40)
    amount: int = _money()
    state: str = Field(default="pending", max_length=16)  # pending | settling | succeeded | failed
    idempotency_key: str | None = Field(default=None, max_length=255)
    reason: str | None = Field(default=None, max_length=1024)
    nonce: str | None = Field(default=None, max_length=66)
    signed_payload: dict[str, Any] | None = _json()
    tx_hash: str | None = Field(default=None, max_length=66)
    failure_reason: str | None = Field(default=None, max_length=1024)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class BudgetLock(SQLModel, table=True):
    """One row per connection, touched first in every budget decision.

    ``UPDATE … SET ticks = ticks + 1`` takes a row lock on PostgreSQL and the write lock on SQLite,
    so budget checks for one connection are serialized on every backend without table locks.
    """

    __tablename__ = "budget_locks"

    connection_id: str = Field(primary_key=True, max_length=40)
    ticks: int = 0


class Reservation(SQLModel, table=True):
    """Money set aside against the budgets before signing.

    held -> confirmed (settled) or released (definitely failed). A reservation whose outcome is
    unknown stays held: the budget fails closed.
    """

    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_conn_created", "connection_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str = Field(max_length=40)
    payment_id: str = Field(index=True, unique=True, max_length=40)
    amount: int = _money()
    status: str = Field(default="held", max_length=12)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Approval(SQLModel, table=True):
    """One admin's decision on a payment waiting in ``requires_approval``.

    Bound to the amount and payee seen when approving: if either changed, the approval does not
    count.
    """

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("payment_id", "admin_key_id", name="uq_approvals_admin"),)

    id: str = Field(primary_key=True, max_length=40)
    payment_id: str = Field(index=True, max_length=40)
    admin_key_id: str = Field(max_length=40)
    principal: str = Field(default="", max_length=120)  # the key's principal when it decided
    decision: str = Field(max_length=8)  # approve | reject
    amount: int = _money()
    payee: str = Field(max_length=42)
    note: str | None = Field(default=None, max_length=1024)
    created_at: datetime = _ts()
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Job(SQLModel, table=True):
    """An action call from the workflow builder; durable so a result survives restarts."""

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=40)
    connection_id: str = Field(index=True, max_length=40)
    action: str = Field(max_length=32)
    # queued, running, requires_approval, pending, succeeded, failed: connector/actions/outcome
    status: str = Field(default="queued", max_length=24)
    input: dict[str, Any] | None = _json()
    result: dict[str, Any] | None = _json()
    error: dict[str, Any] | None = _json()
    payment_id: str | None = Field(default=None, index=True, max_length=40)
    attempts: int = 0
    # The key that asked for the action: four-eyes approval refuses its principal as an approver
    # of the payment this job creates (a requester cannot approve their own payment).
    requested_by: str | None = Field(default=None, max_length=40)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("scope", "key", name="uq_idempotency_scope_key"),)

    id: str = Field(primary_key=True, max_length=40)
    scope: str = Field(max_length=128)  # e.g. "conn_…:send"
    key: str = Field(max_length=255)
    request_hash: str = Field(max_length=64)
    job_id: str | None = Field(default=None, max_length=40)
    # True while the first HTTP request with this key is still being answered; a repeat then gets
    # 409 (IETF Idempotency-Key draft) instead of racing it.
    in_flight: bool = True
    lease_until: datetime = _ts()
    created_at: datetime = _ts()
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
