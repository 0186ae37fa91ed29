"""The one-statement payment writes (PostgreSQL): the same rows, events and sequence numbers as
the unit-of-work functions, all or nothing, and never a silent truncation."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import col

from connector.errors import ConcurrentUpdate
from connector.events import notify
from connector.ids import new_id
from connector.payments import claim, machine
from connector.payments.claim import CLAIM, record_and_claim
from connector.payments.machine import Step, advance_alone, insert_payment_guarded, transition
from connector.payments.states import PaymentState as S
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import UnitOfWork, make_engine, one_connection, transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Payment, PaymentRequest
from tests.fixtures.db import _truncate, create_schema

pytestmark = [pytest.mark.postgres]

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
STEPS = [Step(S.AUTHORIZED, {"hold_expires_at": None}), Step(S.SETTLING, {"settle_attempts": 1})]


@pytest.fixture
def pg(pg_database: str) -> Iterator[Engine]:
    """PostgreSQL only: SQLite has no data-modifying WITH (callers use units of work there)."""
    engine = make_engine(pg_database)
    create_schema(engine)
    _truncate(engine)
    with transaction(engine) as s:
        s.add(
            PaymentRequest(
                id="prq_w", connection_id="conn_w", amount=700, asset="0x" + "1" * 40,
                network="eip155:31337", pay_to="0x" + "2" * 40, token_name="DevUSD",
                token_version="1", max_payments=2,
            )
        )  # fmt: skip
    try:
        yield engine
    finally:
        engine.dispose()


def incoming(**fields: Any) -> Payment:
    return Payment(
        **{
            "id": new_id("pay"), "connection_id": "conn_w", "direction": "incoming",
            "state": "created", "amount": 10**24, "asset": "0x" + "1" * 40,
            "network": "eip155:31337", "payer": "0x" + secrets.token_hex(20),
            "payee": "0x" + "2" * 40, "x402_version": 2, "payment_request_id": "prq_w",
            "nonce": "0x" + secrets.token_hex(32), "valid_before": NOW + timedelta(hours=1),
            "requirement": {"scheme": "exact", "b": 1, "a": [2, 3]},
            "signed_payload": {"z": {"y": 1}, "a": "x"},
            **fields,
        }
    )  # fmt: skip


def rows(engine: Engine, payment_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The stored payment and its events, minus what differs between any two payments."""
    with UnitOfWork(engine) as uow:
        p = uow.session.get(Payment, payment_id)
        assert p is not None
        stored = p.model_dump(exclude={"id", "payer", "nonce"})
        events = [
            {
                "type": e.type, "sequence": e.sequence, "dispatched": e.dispatched,
                "connection_id": e.connection_id,
                "data": {
                    k: v for k, v in e.payload["data"]["payment"].items()
                    if k not in ("id", "payer", "nonce")
                },
                "keys": list(e.payload), "payment_keys": list(e.payload["data"]["payment"]),
            }
            for e in uow.session.execute(
                select(Event).where(col(Event.payment_id) == payment_id).order_by(Event.id)
            ).scalars()
        ]  # fmt: skip
    return stored, events


def paid(engine: Engine) -> int:
    with UnitOfWork(engine) as uow:
        request = uow.session.get(PaymentRequest, "prq_w")
        assert request is not None
        return request.paid_count


def runtime(engine: Engine, tmp_path: Any) -> Runtime:
    return Runtime(settings=Settings(data_dir=tmp_path), engine=engine)


def test_one_statement_writes_the_rows_a_unit_of_work_writes(
    pg: Engine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = runtime(pg, tmp_path)
    alone, together = incoming(), incoming()
    woken: list[int] = []
    notify.on_events_committed(lambda: woken.append(1))
    try:
        assert insert_payment_guarded(
            pg, alone, CLAIM, {"claim_id": "prq_w"}, now=NOW, then=STEPS
        ) == ("open", 1, 2)  # fmt: skip
        assert woken == [1]  # the dispatcher is woken once the statement committed
        advance_alone(pg, alone, [Step(S.SETTLED, {"tx_hash": "0x" + "ab" * 32})], now=NOW)
        assert woken == [1, 1]
    finally:
        notify.clear_listeners()
    monkeypatch.setattr(claim, "writes_alone", lambda _engine: False)  # SQLite's way
    assert record_and_claim(rt, together, STEPS, "prq_w", NOW) == ("open", 2, 2)
    with transaction(pg) as s:
        stored = s.get(Payment, together.id)
        assert stored is not None
        transition(s, stored, S.SETTLED, now=NOW, tx_hash="0x" + "ab" * 32)
    assert rows(pg, alone.id) == rows(pg, together.id)
    stored_alone, events = rows(pg, alone.id)
    assert stored_alone["amount"] == 10**24 and stored_alone["version"] == 4
    assert [(e["type"], e["sequence"]) for e in events] == [
        ("payment.created", 1), ("payment.authorized", 2), ("payment.settling", 3),
        ("payment.settled", 4),
    ]  # fmt: skip
    assert paid(pg) == 2


def test_no_slot_left_writes_nothing(pg: Engine, tmp_path: Any) -> None:
    rt = runtime(pg, tmp_path)
    assert record_and_claim(rt, incoming(), STEPS, "prq_w", NOW) is not None
    assert record_and_claim(rt, incoming(), STEPS, "prq_w", NOW) is not None
    late = incoming()
    assert record_and_claim(rt, late, STEPS, "prq_w", NOW) is None
    assert paid(pg) == 2
    with UnitOfWork(pg) as uow:
        assert uow.session.get(Payment, late.id) is None
        assert not uow.session.execute(select(Event).where(col(Event.payment_id) == late.id)).all()


def test_a_replayed_authorization_writes_nothing_not_even_the_claim(
    pg: Engine, tmp_path: Any
) -> None:
    rt = runtime(pg, tmp_path)
    first = incoming()
    record_and_claim(rt, first, STEPS, "prq_w", NOW)
    replay = incoming(payer=first.payer, nonce=first.nonce)
    with pytest.raises(IntegrityError):
        record_and_claim(rt, replay, STEPS, "prq_w", NOW)
    assert paid(pg) == 1  # the claim ran first in the statement and was undone with it
    with UnitOfWork(pg) as uow:
        assert uow.session.get(Payment, replay.id) is None


def test_a_value_too_long_is_refused_not_truncated(pg: Engine, tmp_path: Any) -> None:
    with pytest.raises(DataError):
        record_and_claim(runtime(pg, tmp_path), incoming(description="x" * 1025), STEPS,
                         "prq_w", NOW)  # fmt: skip
    assert paid(pg) == 0


def test_a_stale_copy_moves_nothing(pg: Engine, tmp_path: Any) -> None:
    rt = runtime(pg, tmp_path)
    mine = incoming()
    record_and_claim(rt, mine, STEPS, "prq_w", NOW)
    with transaction(pg) as s:  # someone else (the reconciler) settled it meanwhile
        theirs = s.get(Payment, mine.id)
        assert theirs is not None
        transition(s, theirs, S.SETTLED, tx_hash="0x" + "cd" * 32)
    with pytest.raises(ConcurrentUpdate):
        advance_alone(pg, mine, [Step(S.SETTLED, {"tx_hash": "0x" + "ab" * 32})])
    assert mine.state == "settling" and mine.version == 3  # unchanged in memory
    _, events = rows(pg, mine.id)
    assert [e["type"] for e in events][-1] == "payment.settled" and len(events) == 4
    with UnitOfWork(pg) as uow:
        stored = uow.session.get(Payment, mine.id)
        assert stored is not None and stored.tx_hash == "0x" + "cd" * 32


def test_a_payment_a_job_may_wait_on_is_left_to_the_unit_of_work(pg: Engine, tmp_path: Any) -> None:
    rt = runtime(pg, tmp_path)
    custodial = incoming(custodial=True)
    record_and_claim(rt, custodial, STEPS, "prq_w", NOW)
    assert not advance_alone(pg, custodial, [Step(S.SETTLED, {"tx_hash": "0x" + "ab" * 32})])
    assert custodial.state == "settling" and custodial.version == 3
    _, events = rows(pg, custodial.id)
    assert len(events) == 3


def test_not_used_on_a_pinned_connection(pg: Engine) -> None:
    """A job's connection (one_connection) keeps its transactions: no autocommit side door."""
    assert machine.writes_alone(pg)
    with one_connection(pg):
        assert not machine.writes_alone(pg)
