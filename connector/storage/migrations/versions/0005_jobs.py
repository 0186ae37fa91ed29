"""jobs: room for the waiting statuses, and a lookup from a payment to its jobs

``requires_approval`` and ``pending`` are job statuses now (a job follows its payment until the
payment's outcome is known), so the status column grows; a job waiting on a payment is found by
``payment_id`` whenever that payment moves on.

Revision ID: 0005_jobs
Revises: 0002_unknown_outcomes
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005_jobs"
down_revision: str | None = "0004_event_sequence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column(
            "status",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=12),
            type_=sqlmodel.sql.sqltypes.AutoString(length=24),
            existing_nullable=False,
        )
        batch_op.create_index(batch_op.f("ix_jobs_payment_id"), ["payment_id"], unique=False)


def downgrade() -> None:
    # Waiting statuses do not fit the old column: they become ``running`` (the stale-job sweep
    # re-runs them, and a re-run resumes the job's payment).
    op.execute(
        sa.text("UPDATE jobs SET status = 'running' WHERE status IN ('requires_approval', 'pending')")
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_payment_id"))
        batch_op.alter_column(
            "status",
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=24),
            type_=sqlmodel.sql.sqltypes.AutoString(length=12),
            existing_nullable=False,
        )
