"""per-payment event sequence; deliveries carry it for ordered delivery

Revision ID: 0004_event_sequence
Revises: 0002_unknown_outcomes

``events.sequence`` numbers each payment's events 1, 2, 3… (unique per payment).
``deliveries.payment_id``/``sequence`` are copied from the event at fan-out so the dispatcher can
send a payment's events to a subscription in order; a partial index covers only unfinished
deliveries. Existing rows are numbered in id order (the order they were written and sent in).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004_event_sequence"
down_revision: str | None = "0002_unknown_outcomes"  # rebased onto main (was 0001_initial)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = "status IN ('pending', 'sending')"


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sequence", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE events SET sequence = (SELECT count(*) FROM events AS e2"
        " WHERE e2.payment_id = events.payment_id AND e2.id <= events.id)"
        " WHERE payment_id IS NOT NULL"
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            "uq_events_payment_sequence", ["payment_id", "sequence"], unique=True
        )

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("payment_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
        )
        batch_op.add_column(sa.Column("sequence", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE deliveries SET"
        " payment_id = (SELECT e.payment_id FROM events AS e WHERE e.id = deliveries.event_id),"
        " sequence = (SELECT e.sequence FROM events AS e WHERE e.id = deliveries.event_id)"
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_chain_open",
            ["subscription_id", "payment_id", "sequence"],
            unique=False,
            postgresql_where=sa.text(_OPEN),
            sqlite_where=sa.text(_OPEN),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_chain_open")
        batch_op.drop_column("sequence")
        batch_op.drop_column("payment_id")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("uq_events_payment_sequence")
        batch_op.drop_column("sequence")
