"""A PostgreSQL address that accepts TCP connections and never answers fails a connect.

Without a connect timeout libpq waits for ever, so a request or task that needed a new pooled
connection hung with it. The server here is a loopback socket that accepts and stays silent.
"""

from __future__ import annotations

import socket
import threading

import pytest
from sqlalchemy.exc import OperationalError

from connector.storage.db import make_engine


@pytest.mark.slow
def test_connecting_to_a_silent_database_gives_up_with_an_error() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    port = server.getsockname()[1]
    engine = make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
        pool_pre_ping=False,
    )
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            engine.connect().close()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(60)  # a hang detector, not a speed check (the default timeout is 10 s)
    try:
        assert not thread.is_alive(), "connect is still waiting on the silent server"
        assert errors and isinstance(errors[0], OperationalError), errors
    finally:
        for conn in held:
            conn.close()
        server.close()
        engine.dispose()
