"""Engine and unit of work, identical on SQLite (embedded) and PostgreSQL (production).

A :class:`UnitOfWork` is one database transaction: a service opens it, changes rows, appends
outbox events, and commits once, so a state change and its event are never separated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy import event, literal, select, table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlmodel import Session, create_engine

#: libpq settings of every PostgreSQL connection (a caller's own ``connect_args`` win).
_CONNECT_DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the settings each backend needs for safe concurrent use."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # psycopg prepares a statement on the server after N executions per connection (default 5);
    # a worker's hot statements repeat on every payment, so prepare them from the second use.
    connect_args = kwargs.setdefault("connect_args", {})
    connect_args.setdefault("prepare_threshold", 2)
    # A server that accepts the TCP connection and never answers (hung, or a half-open path)
    # must fail a connect, not block the request or task that opened it for ever; keepalives
    # find a peer that vanished under an open pooled connection.
    for name, value in _CONNECT_DEFAULTS.items():
        connect_args.setdefault(name, value)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


# The connection that units of work opened in this thread (or task) should use, if any.
_PINNED: ContextVar[tuple[Engine, Connection] | None] = ContextVar("x402c_pinned", default=None)


@contextmanager
def one_connection(engine: Engine) -> Iterator[None]:
    """Run the units of work opened inside the block on one pooled connection, one after another.

    A job makes two or three short transactions. Checking a connection out of the pool for each
    costs a liveness ping (a round trip) and pool bookkeeping every time; holding one for the
    job costs one ping. A unit of work opened while another is still open on the pinned
    connection (nesting) gets its own connection, exactly as without the pin.
    """
    with engine.connect() as conn:
        token = _PINNED.set((engine, conn))
        try:
            yield
        finally:
            _PINNED.reset(token)


def pinned(engine: Engine) -> bool:
    """Whether units of work opened here run on a connection pinned by :func:`one_connection`."""
    found = _PINNED.get()
    return found is not None and found[0] is engine


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in autocommit mode: each statement is its own transaction, with no
    BEGIN or COMMIT round trip (for writers whose whole transaction is one statement). The pool
    puts the connection back in its usual mode when it is returned."""
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def warm_pool(engine: Engine, connections: int, tables: list[str]) -> None:
    """Open ``connections`` pooled connections and let each server process load ``tables``.

    A new PostgreSQL backend reads the catalog for every table and index it touches first; a
    worker that starts cold pays that (and the connection set-up) on its first payments. Run at
    worker start, before the worker takes tasks. Skipped on SQLite (one file, nothing to warm).
    """
    if engine.dialect.name != "postgresql" or connections < 1:
        return
    probes = [select(literal(1)).select_from(table(name)).limit(0) for name in tables]
    opened: list[Connection] = []
    try:
        for _ in range(min(connections, engine.pool.size())):  # type: ignore[attr-defined]
            conn = engine.connect()
            opened.append(conn)
            for probe in probes:
                conn.execute(probe)
            conn.rollback()
    finally:
        for conn in opened:
            conn.close()


class UnitOfWork:
    """One transaction. Use as ``with UnitOfWork(engine) as uow: ...; uow.commit()``.

    Leaving the block without ``commit()`` rolls back, so an exception can never half-apply.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session: Session | None = None
        #: A commit() returned: what this unit of work wrote is in the database (a caller that
        #: lost its connection later can tell whether an earlier write of it stands).
        self.committed = False

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("UnitOfWork used outside its with-block")
        return self._session

    def __enter__(self) -> UnitOfWork:
        pinned = _PINNED.get()
        if pinned is not None and pinned[0] is self.engine and not pinned[1].in_transaction():
            # The session begins (and owns) the transaction on the pinned connection; close()
            # ends it and leaves the connection open for the next unit of work.
            self._session = Session(bind=pinned[1], expire_on_commit=False)
        else:
            self._session = Session(self.engine, expire_on_commit=False)
        return self

    def __exit__(self, *exc: object) -> None:
        # close() rolls back anything uncommitted at the database and detaches objects without
        # expiring them, so values read inside the block stay usable after it.
        assert self._session is not None
        try:
            self._session.close()
        finally:
            self._session = None

    def commit(self) -> None:
        self.session.commit()
        self.committed = True

    def rollback(self) -> None:
        self.session.rollback()


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """Shorthand: a session that commits on success and rolls back on error."""
    with UnitOfWork(engine) as uow:
        yield uow.session
        uow.commit()


#: Errors that mean "the database connection (or the server) went away", not "bad statement".
CONNECTION_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` is a lost or refused database connection: the unit of work did not
    commit, so running it again on a new connection is safe (a blip, not a bug)."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
