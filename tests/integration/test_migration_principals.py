"""Migration 0003_principals gives existing keys a principal from their history, so keys minted
by another key before the upgrade already count as their minter's person; and it reverses."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine

from connector.storage import migrate
from connector.storage.db import make_engine
from connector.storage.types import Uint256, UTCDateTime
from tests.fixtures.db import PG_ADMIN_DSN, _pg_url


@pytest.fixture(params=["sqlite", "postgres"])
def blank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database (no schema at all)."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'blank.db'}")
        yield engine
        engine.dispose()
        return
    name = f"x402c_m_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_pg_url(name))
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


KEYS = sa.table(
    "admin_keys",
    sa.column("id", sa.String),
    sa.column("name", sa.String),
    sa.column("prefix", sa.String),
    sa.column("secret_hash", sa.String),
    sa.column("scopes", sa.JSON),
    sa.column("created_at", UTCDateTime()),
)
AUDIT = sa.table(
    "audit_log",
    sa.column("id", sa.String),
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("target_type", sa.String),
    sa.column("target_id", sa.String),
    sa.column("at", UTCDateTime()),
)
APPROVALS = sa.table(
    "approvals",
    sa.column("id", sa.String),
    sa.column("payment_id", sa.String),
    sa.column("admin_key_id", sa.String),
    sa.column("decision", sa.String),
    sa.column("amount", Uint256()),
    sa.column("payee", sa.String),
    sa.column("created_at", UTCDateTime()),
    sa.column("expires_at", UTCDateTime()),
)


def test_existing_keys_inherit_their_minters_principal(blank: Engine) -> None:
    migrate.upgrade(blank, "0001_initial")
    t0 = datetime.now(UTC) - timedelta(days=3)
    # key_a (CLI) minted key_b through the API, which minted key_c; key_d is another CLI key.
    lineage = {"key_a": "cli", "key_b": "key_a", "key_c": "key_b", "key_d": "cli"}
    with blank.begin() as conn:
        for i, (key_id, actor) in enumerate(lineage.items()):
            at = t0 + timedelta(minutes=i)
            conn.execute(
                KEYS.insert().values(
                    id=key_id,
                    name=key_id,
                    prefix=f"x402c_sk_{key_id}",
                    secret_hash="0" * 64,
                    scopes=["admin"],
                    created_at=at,
                )
            )
            conn.execute(
                AUDIT.insert().values(
                    id=f"aud_{i}",
                    actor=actor,
                    action="admin_key.create",
                    target_type="admin_key",
                    target_id=key_id,
                    at=at,
                )
            )
        for key_id in ("key_a", "key_c", "key_d"):
            conn.execute(
                APPROVALS.insert().values(
                    id=f"apr_{key_id}",
                    payment_id="pay_1",
                    admin_key_id=key_id,
                    decision="approve",
                    amount=5,
                    payee="0x" + "ab" * 20,
                    created_at=t0,
                    expires_at=t0 + timedelta(days=9),
                )
            )
    migrate.upgrade(blank)
    with blank.connect() as conn:
        keys = {
            row.id: (row.principal, row.created_by, row.connection_ids)
            for row in conn.execute(
                sa.text("SELECT id, principal, created_by, connection_ids FROM admin_keys")
            )
        }
        approvals = dict(
            conn.execute(sa.text("SELECT admin_key_id, principal FROM approvals")).all()
        )
    assert keys == {
        "key_a": ("key:key_a", "cli", None),
        "key_b": ("key:key_a", "key_a", None),
        "key_c": ("key:key_a", "key_b", None),
        "key_d": ("key:key_d", "cli", None),
    }
    # Two of the three old approvals now show as the same person.
    assert approvals == {"key_a": "key:key_a", "key_c": "key:key_a", "key_d": "key:key_d"}
    assert migrate.pending_changes(blank) == []

    cfg = migrate.alembic_config()
    with blank.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001_initial")
    with blank.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("admin_keys")}
    assert "principal" not in columns
    migrate.upgrade(blank)
