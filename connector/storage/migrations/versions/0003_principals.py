"""principals: admin keys bound to a principal and to connections; subscriptions remember their
creator; approvals record the approving principal

Revision ID: 0003_principals
Revises: 0001_initial

Existing keys get a principal from their history: a key whose ``admin_key.create`` audit entry
names another key as actor inherits that key's principal (the four-eyes hole this closes); every
other key becomes its own principal ``key:<id>``, since who held it is unknown. Existing keys keep
access to every connection (``connection_ids`` NULL) until re-minted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003_principals"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_keys = sa.table(
    "admin_keys",
    sa.column("id", sa.String),
    sa.column("created_at", sa.DateTime),
    sa.column("principal", sa.String),
    sa.column("created_by", sa.String),
)
_audit = sa.table(
    "audit_log",
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("target_id", sa.String),
)
_approvals = sa.table(
    "approvals",
    sa.column("id", sa.String),
    sa.column("admin_key_id", sa.String),
    sa.column("principal", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("admin_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("principal", sqlmodel.sql.sqltypes.AutoString(length=120), nullable=True)
        )
        batch_op.add_column(
            sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True)
        )
        batch_op.add_column(sa.Column("connection_ids", sa.JSON(), nullable=True))
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("principal", sqlmodel.sql.sqltypes.AutoString(length=120), nullable=True)
        )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "created_by_key", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True
            )
        )

    bind = op.get_bind()
    creators = {
        target: actor
        for actor, target in bind.execute(
            sa.select(_audit.c.actor, _audit.c.target_id).where(
                _audit.c.action == "admin_key.create"
            )
        )
    }
    principals: dict[str, str] = {}
    for (key_id,) in bind.execute(sa.select(_keys.c.id).order_by(_keys.c.created_at, _keys.c.id)):
        creator = creators.get(key_id)
        principal = principals.get(creator or "", f"key:{key_id}")
        principals[key_id] = principal
        bind.execute(
            _keys.update()
            .where(_keys.c.id == key_id)
            .values(principal=principal, created_by=creator)
        )
    for approval_id, key_id in bind.execute(
        sa.select(_approvals.c.id, _approvals.c.admin_key_id)
    ).all():
        bind.execute(
            _approvals.update()
            .where(_approvals.c.id == approval_id)
            .values(principal=principals.get(key_id, f"key:{key_id}"))
        )

    with op.batch_alter_table("admin_keys", schema=None) as batch_op:
        batch_op.alter_column(
            "principal", existing_type=sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False
        )
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.alter_column(
            "principal", existing_type=sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_column("created_by_key")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_column("principal")
    with op.batch_alter_table("admin_keys", schema=None) as batch_op:
        batch_op.drop_column("connection_ids")
        batch_op.drop_column("created_by")
        batch_op.drop_column("principal")
