"""Alembic environment: runs on the connection handed in by ``connector.storage.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import connector.storage.models  # noqa: F401  (registers every table)

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from connector.settings import get_settings
        from connector.storage.db import make_engine

        engine = make_engine(get_settings().resolved_database_url)
        with engine.begin() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
