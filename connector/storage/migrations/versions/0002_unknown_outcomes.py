"""beat ticks: when each periodic task last ran (reported by /healthz)

Revision ID: 0002_unknown_outcomes
Revises: 0003_principals (re-chained after rebasing on main)
Create Date: 2026-11-28 17:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import connector.storage.types

revision: str = "0002_unknown_outcomes"
down_revision: str | None = "0006b_networks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "beat_ticks",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("ran_at", connector.storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("beat_ticks")
