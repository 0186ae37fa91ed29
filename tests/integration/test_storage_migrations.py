"""The Alembic revisions build exactly the schema the models describe, on both databases."""

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from connector.storage.migrate import alembic_config, current_heads, pending_changes


def test_migrations_reach_head_and_match_the_models(engine: Engine) -> None:
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    assert len(heads) == 1  # one linear history
    assert current_heads(engine) == heads
    assert pending_changes(engine) == []
