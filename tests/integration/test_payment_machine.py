"""Transitions on SQLite and PostgreSQL: events in the same transaction, optimistic locking."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.errors import ConcurrentUpdate, IllegalTransition
from connector.ids import new_id
from connector.payments.machine import Step, advance, insert_payment, transition
from connector.payments.states import PaymentState as S
from connector.storage.db import UnitOfWork, transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Payment


def new_payment() -> Payment:
    return Payment(
        id=new_id("pay"),
        connection_id="conn_x",
        direction="outgoing",
        state="created",
        amount=10**24,  # beyond int64: must stay exact
        asset="0x" + "1" * 40,
        network="eip155:31337",
        payee="0x" + "2" * 40,
    )


def events_of(engine: Engine, payment_id: str) -> list[str]:
    with transaction(engine) as s:
        rows = s.execute(select(Event).where(Event.payment_id == payment_id).order_by(Event.id))
        return [e.type for e in rows.scalars()]


def test_each_transition_writes_its_event_atomically(engine: Engine) -> None:
    with transaction(engine) as s:
        p = insert_payment(s, new_payment())
        transition(s, p, S.AUTHORIZED, nonce="0x" + "a" * 64)
    with UnitOfWork(engine) as uow:  # rolled back: neither the state nor the event survive
        again = uow.session.get(Payment, p.id)
        assert again is not None
        transition(uow.session, again, S.SETTLING)
    with transaction(engine) as s:
        stored = s.get(Payment, p.id)
        assert stored is not None and stored.state == "authorized" and stored.version == 2
        assert stored.amount == 10**24
    assert events_of(engine, p.id) == ["payment.created", "payment.authorized"]
    with transaction(engine) as s:
        ev = s.execute(select(Event).where(Event.type == "payment.authorized")).scalar_one()
        assert ev.payload["data"]["payment"]["amount"] == str(10**24)
        assert ev.payload["data"]["payment"]["state"] == "authorized"


def test_stale_copy_loses_the_race(engine: Engine) -> None:
    with transaction(engine) as s:
        p = insert_payment(s, new_payment())
    with transaction(engine) as s:
        first = s.get(Payment, p.id)
        assert first is not None
    with transaction(engine) as s:
        winner = s.get(Payment, p.id)
        assert winner is not None
        transition(s, winner, S.AUTHORIZED)
    with pytest.raises(ConcurrentUpdate), transaction(engine) as s:
        transition(s, first, S.REJECTED)  # first still says version 1
    assert events_of(engine, p.id) == ["payment.created", "payment.authorized"]


def test_illegal_transition_writes_nothing(engine: Engine) -> None:
    with transaction(engine) as s:
        p = insert_payment(s, new_payment())
    with pytest.raises(IllegalTransition), transaction(engine) as s:
        transition(s, p, S.SETTLED)
    with transaction(engine) as s:
        stored = s.get(Payment, p.id)
        assert stored is not None and stored.state == "created"


def test_a_new_payment_can_take_several_steps_in_one_write(engine: Engine) -> None:
    with transaction(engine) as s:
        p = insert_payment(
            s,
            new_payment(),
            then=[
                Step(S.AUTHORIZED, {"nonce": "0x" + "b" * 64}),
                Step(S.SETTLING, {"settle_attempts": 1}),
            ],
        )
    with transaction(engine) as s:
        stored = s.get(Payment, p.id)
        assert stored is not None
        assert (stored.state, stored.version, stored.settle_attempts) == ("settling", 3, 1)
        assert stored.nonce == "0x" + "b" * 64
        events = s.execute(
            select(Event).where(Event.payment_id == p.id).order_by(Event.id)
        ).scalars()
        # One event per state passed through, each with the snapshot as of that step.
        seen = [
            (e.type, e.payload["data"]["payment"]["state"], e.payload["data"]["payment"]["version"])
            for e in events
        ]
    assert seen == [
        ("payment.created", "created", 1),
        ("payment.authorized", "authorized", 2),
        ("payment.settling", "settling", 3),
    ]


def test_an_illegal_step_in_a_chain_writes_nothing(engine: Engine) -> None:
    with pytest.raises(IllegalTransition), transaction(engine) as s:
        insert_payment(s, new_payment(), then=[Step(S.AUTHORIZED), Step(S.REFUNDED)])
    with transaction(engine) as s:
        assert s.execute(select(Payment)).first() is None
        assert s.execute(select(Event)).first() is None


def test_a_lost_race_leaves_the_copy_in_hand_unchanged(engine: Engine) -> None:
    with transaction(engine) as s:
        p = insert_payment(s, new_payment())
    with transaction(engine) as s:
        winner = s.get(Payment, p.id)
        assert winner is not None
        transition(s, winner, S.AUTHORIZED)
    with pytest.raises(ConcurrentUpdate), transaction(engine) as s:
        advance(s, p, [Step(S.AUTHORIZED), Step(S.SETTLING)])
    # The caller can still tell what it last knew, and retry from a fresh read.
    assert (p.state, p.version) == ("created", 1)


def test_applying_escrow_events_keeps_the_ledgers_other_keys(engine: Engine) -> None:
    """The operator records its in-flight operations in the ledger (``escrow.ops``); applying
    escrow events must not wipe them (it used to rebuild the ledger from the totals alone)."""
    from connector.payments.escrow_ledger import apply_escrow_events
    from connector.payments.machine import update_fields
    from connector.x402.auth_capture import EscrowEvent

    def event(name: str, amount: int, block: int) -> EscrowEvent:
        return EscrowEvent(name, amount, "0x" + f"{block:064x}", block, 0)

    ops = [{"key": "job_1", "type": "capture", "status": "pending", "tx_hash": "0x1"}]
    with transaction(engine) as s:
        p = insert_payment(s, new_payment(), then=[Step(S.SETTLING)])
        apply_escrow_events(s, p, [event("PaymentAuthorized", 100, 1)], confirmed_through=None)
        update_fields(s, p, escrow={**(p.escrow or {}), "ops": ops})
        apply_escrow_events(s, p, [event("PaymentCaptured", 40, 2)], confirmed_through=None)
    with transaction(engine) as s:
        stored = s.get(Payment, p.id)
        assert stored is not None and stored.state == "captured"
        assert stored.escrow is not None and stored.escrow["ops"] == ops
        assert (stored.escrow["held"], stored.escrow["captured"]) == ("60", "40")
    assert events_of(engine, p.id)[-2:] == ["payment.authorized", "payment.captured"]
