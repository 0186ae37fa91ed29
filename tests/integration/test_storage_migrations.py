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


def test_one_connection_serves_successive_units_of_work_and_not_nested_ones(
    engine: Engine,
) -> None:
    from connector.storage.db import UnitOfWork, one_connection

    def raw(uow: UnitOfWork) -> object:
        return uow.session.connection().connection.dbapi_connection

    with one_connection(engine):
        with UnitOfWork(engine) as first:
            a = raw(first)
            first.commit()
        with UnitOfWork(engine) as second:
            assert raw(second) is a  # the same pooled connection, no new checkout
            with UnitOfWork(engine) as nested:  # while `second` is open: its own connection
                assert raw(nested) is not a
            second.rollback()
