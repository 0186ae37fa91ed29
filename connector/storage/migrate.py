"""Apply Alembic migrations programmatically (``x402c migrate`` and the test fixtures).

The same revisions run on SQLite and PostgreSQL (batch mode keeps SQLite ALTERs working).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def is_current(engine: Engine) -> bool:
    """True if the database is at the newest revision (False for an empty database too)."""
    from alembic.script import ScriptDirectory

    return current_heads(engine) == set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_heads(engine: Engine) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def pending_changes(engine: Engine) -> list[object]:
    """Differences between the models and the migrated schema (empty = migrations complete)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    import connector.storage.models  # noqa: F401

    with engine.connect() as connection:
        ctx = MigrationContext.configure(connection)
        return list(compare_metadata(ctx, SQLModel.metadata))
