"""The Alembic revisions build exactly the schema the models describe, on both databases."""

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from connector.storage.migrate import alembic_config, current_heads, pending_changes


def test_migrations_reach_head_and_match_the_models(engine: Engine) -> None:
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    assert len(heads) == 1  # one linear history
    assert current_heads(engine) == heads
    assert pending_changes(engine) == []


def test_warm_pool_opens_and_keeps_the_requested_connections(pg_database: str) -> None:
    from connector.storage.db import make_engine, warm_pool
    from tests.fixtures.db import create_schema

    engine = make_engine(pg_database, pool_size=4)
    try:
        create_schema(engine)
        warm_pool(engine, 3, ["jobs", "payments"])
        assert engine.pool.checkedin() == 3  # type: ignore[attr-defined]
        warm_pool(engine, 10, ["jobs"])  # never more than the pool keeps
        assert engine.pool.checkedin() == 4  # type: ignore[attr-defined]
    finally:
        engine.dispose()
