"""receive-only connections (pay_to, optional wallet key); JWT facilitator auth (api_key_id);
paywall protocol modes

Revision ID: 0006b_networks
Revises: 0003_principals
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006b_networks"
down_revision: str | None = "0003_principals"  # rebased onto main (was 0001_initial)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pay_to", sqlmodel.sql.sqltypes.AutoString(length=42), nullable=True)
        )
        batch_op.add_column(
            sa.Column("api_key_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True)
        )
        batch_op.alter_column(
            "wallet_key_token",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=4096),
            nullable=True,
        )
        batch_op.alter_column(
            "wallet_address",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=42),
            nullable=True,
        )
    with op.batch_alter_table("payment_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "protocols",
                sqlmodel.sql.sqltypes.AutoString(length=8),
                nullable=False,
                server_default="both",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("payment_requests", schema=None) as batch_op:
        batch_op.drop_column("protocols")
    # Receive-only connections have no wallet and cannot exist in the older schema; refuse
    # rather than delete a customer's connection.
    count = op.get_bind().execute(
        sa.text("SELECT COUNT(*) FROM connections WHERE wallet_key_token IS NULL")
    ).scalar()
    if count:
        raise RuntimeError(f"{count} receive-only connection(s) exist; give them a wallet first")
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.alter_column(
            "wallet_address",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=42),
            nullable=False,
        )
        batch_op.alter_column(
            "wallet_key_token",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=4096),
            nullable=False,
        )
        batch_op.drop_column("api_key_id")
        batch_op.drop_column("pay_to")
