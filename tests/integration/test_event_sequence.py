"""Per-payment event sequence numbers, on SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from connector.events.outbox import record_event
from connector.ids import new_id
from connector.payments.machine import Step, insert_payment, transition
from connector.payments.states import PaymentState as S
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Payment
from tests.fixtures.db import PG_ADMIN_DSN, _pg_url


def new_payment() -> Payment:
    return Payment(
        id=new_id("pay"),
        connection_id="conn_x",
        direction="outgoing",
        state="created",
        amount=10_000,
        asset="0x" + "1" * 40,
        network="eip155:31337",
        payee="0x" + "2" * 40,
    )


def sequences(engine: Engine, payment_id: str) -> list[tuple[str, int | None]]:
    with transaction(engine) as s:
        rows = s.execute(
            select(Event).where(Event.payment_id == payment_id).order_by(Event.sequence)
        ).scalars()
        return [(e.type, e.sequence) for e in rows]


def test_a_payments_events_are_numbered_one_by_one_across_transactions(engine: Engine) -> None:
    with transaction(engine) as s:  # three events in one statement batch
        p = insert_payment(s, new_payment(), then=[Step(S.AUTHORIZED), Step(S.SETTLING)])
        other = insert_payment(s, new_payment())
    with transaction(engine) as s:
        stored = s.get(Payment, p.id)
        assert stored is not None
        transition(s, stored, S.SETTLED, tx_hash="0x" + "a" * 64)
        late = record_event(s, "payment.settled_late", "conn_x", {}, payment_id=p.id)
        test = record_event(s, "webhook.test", "conn_x", {})
    assert sequences(engine, p.id) == [
        ("payment.created", 1),
        ("payment.authorized", 2),
        ("payment.settling", 3),
        ("payment.settled", 4),
        ("payment.settled_late", 5),
    ]
    assert late["sequence"] == 5 and test["sequence"] is None
    assert sequences(engine, other.id) == [("payment.created", 1)]  # numbered per payment
    with transaction(engine) as s:
        assert s.get(Event, test["id"]).sequence is None  # type: ignore[union-attr]


def wait_for_a_blocked_backend(engine: Engine) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the second writer never blocked")


def test_a_racing_writer_without_the_payment_lock_fails_instead_of_reusing_a_number(
    engine: Engine,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite serializes writers: no race to lose")
    with transaction(engine) as s:
        p = insert_payment(s, new_payment())
    first_wrote = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        first_wrote.wait(10)
        try:
            with transaction(engine) as s:
                record_event(s, "payment.settled_late", "conn_x", {}, payment_id=p.id)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=second)
    worker.start()
    with transaction(engine) as s:
        record_event(s, "payment.settled_late", "conn_x", {}, payment_id=p.id)
        first_wrote.set()
        # The second computed sequence 2 as well: its insert waits on the unique index...
        wait_for_a_blocked_backend(engine)
    worker.join(30)  # ...and fails once the first commits
    assert len(errors) == 1 and isinstance(errors[0], IntegrityError)
    assert sequences(engine, p.id) == [("payment.created", 1), ("payment.settled_late", 2)]


@pytest.fixture(params=["sqlite", "postgres"])
def blank_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database of its own (the migration test builds it revision by
    revision, so it must not share the per-worker database)."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'blank.db'}")
        yield engine
        engine.dispose()
        return
    name = f"x402c_t_seq_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(_pg_url(name))
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_migration_numbers_existing_events_in_the_order_they_were_written(
    blank_engine: Engine,
) -> None:
    engine = blank_engine
    migrate.upgrade(engine, "0001_initial")
    pay = new_id("pay")
    ids = [new_id("evt") for _ in range(4)]
    stamp = "2026-11-23 00:00:00+00:00"
    with engine.begin() as conn:
        for i, event_id in enumerate(ids):
            conn.execute(
                text(
                    "INSERT INTO events (id, type, connection_id, payment_id, payload,"
                    " dispatched, created_at) VALUES (:id, 'payment.created', 'conn_x',"
                    " :pay, '{}', :d, :t)"
                ),
                {"id": event_id, "pay": pay if i < 3 else None, "d": i == 0, "t": stamp},
            )
        conn.execute(
            text(
                "INSERT INTO deliveries (id, event_id, subscription_id, status, attempts,"
                " created_at, updated_at) VALUES ('whd_1', :e, 'sub_1', 'pending', 0, :t, :t)"
            ),
            {"e": ids[1], "t": stamp},
        )
    migrate.upgrade(engine)
    with engine.connect() as conn:
        got = conn.execute(text("SELECT id, sequence FROM events ORDER BY id")).all()
        delivery = conn.execute(text("SELECT payment_id, sequence FROM deliveries")).one()
    assert [tuple(r) for r in got] == [(ids[0], 1), (ids[1], 2), (ids[2], 3), (ids[3], None)]
    assert tuple(delivery) == (pay, 2)
    # Reversible: down to the first revision and up again.
    cfg = migrate.alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0001_initial")
    migrate.upgrade(engine)
    assert migrate.pending_changes(engine) == []
