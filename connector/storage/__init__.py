"""Persistence: SQLModel tables, engine/session setup, unit of work, Alembic migrations."""
