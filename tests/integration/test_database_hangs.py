"""A PostgreSQL address that accepts TCP connections and never answers fails a connect.

Without a connect timeout libpq waits for ever, so a request or task that needed a new pooled
connection hung with it. The server here is a loopback socket that accepts and stays silent.
"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from connector.storage.db import make_engine
from tests.fixtures.net import finishes


@pytest.mark.slow
def test_connecting_to_a_silent_database_gives_up_with_an_error(silent_server: int) -> None:
    engine = make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test", pool_pre_ping=False
    )
    try:
        errors = finishes(lambda: engine.connect().close())  # the default timeout is 10 s
    finally:
        engine.dispose()
    assert errors and isinstance(errors[0], OperationalError), errors
