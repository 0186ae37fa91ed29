"""on-chain escrow: payment escrow ledger and captured amount; payment request scheme and terms

Revision ID: 0006_escrow
Revises: 0005_jobs

``payments.captured_amount`` (uint256, 0 for every existing payment) and ``payments.escrow``
(JSON ledger read from the escrow contract) carry an ``authCapture`` payment's amounts;
``payment_requests.scheme`` ("exact" for every existing paywall) and ``escrow_terms`` (capture
and refund deadlines, fee bounds, operator) describe what a paywall offers.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import connector.storage.types

revision: str = "0006_escrow"
down_revision: str | None = "0005_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Uint256 is NUMERIC on PostgreSQL and a zero-padded string elsewhere (see storage/types.py).
    zero = "0" if op.get_bind().dialect.name == "postgresql" else "'" + "0" * 78 + "'"
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "captured_amount",
                connector.storage.types.Uint256(length=78),
                nullable=False,
                server_default=sa.text(zero),
            )
        )
        batch_op.add_column(sa.Column("escrow", sa.JSON(), nullable=True))
    with op.batch_alter_table("payment_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "scheme",
                sqlmodel.sql.sqltypes.AutoString(length=32),
                nullable=False,
                server_default="exact",
            )
        )
        batch_op.add_column(sa.Column("escrow_terms", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payment_requests", schema=None) as batch_op:
        batch_op.drop_column("escrow_terms")
        batch_op.drop_column("scheme")
    with op.batch_alter_table("payments", schema=None) as batch_op:
        batch_op.drop_column("escrow")
        batch_op.drop_column("captured_amount")
