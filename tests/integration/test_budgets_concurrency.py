"""Budgets hold under concurrency: many parallel reservations never exceed the limit."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import cast

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.errors import ConcurrentUpdate, PolicyRefused
from connector.ids import new_id
from connector.payments import escrow_sync
from connector.payments.machine import Step, insert_payment
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.policy.rules import SpendingPolicy
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Payment, Reservation
from connector.x402.auth_capture import EscrowEvent


def test_parallel_reservations_never_exceed_the_daily_budget(engine: Engine) -> None:
    policy = SpendingPolicy(budget_day="1000", budget_alert_ratio=0.5)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(_: int) -> None:
        try:
            with transaction(engine) as s:
                budgets.reserve(
                    s, connection_id="conn_b", payment_id=new_id("pay"), amount=30, policy=policy
                )
            result = "ok"
        except PolicyRefused as refused:
            assert refused.rule == "budget.day"
            result = "refused"
        with lock:
            outcomes.append(result)

    workers = 16 if engine.dialect.name == "postgresql" else 4
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(attempt, range(60)))
    assert outcomes.count("ok") == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
    assert outcomes.count("refused") == 27
    with transaction(engine) as s:
        held = s.execute(select(Reservation)).scalars().all()
        assert sum(r.amount for r in held) == 990
        alerts = s.execute(select(Event).where(Event.type == "budget.threshold_reached")).all()
        assert len(alerts) == 1  # crossing 50% happened exactly once


def test_released_reservations_free_the_budget_and_confirmed_ones_do_not(engine: Engine) -> None:
    policy = SpendingPolicy(budget_week="100")
    with transaction(engine) as s:
        budgets.reserve(s, connection_id="c", payment_id="pay_1", amount=60, policy=policy)
        budgets.reserve(s, connection_id="c", payment_id="pay_2", amount=40, policy=policy)
    with pytest.raises(PolicyRefused), transaction(engine) as s:
        budgets.reserve(s, connection_id="c", payment_id="pay_3", amount=1, policy=policy)
    with transaction(engine) as s:
        assert budgets.confirm(s, "pay_1")
        assert budgets.release(s, "pay_2")
        assert not budgets.release(s, "pay_1")  # confirmed spend cannot be released
    with transaction(engine) as s:
        budgets.reserve(s, connection_id="c", payment_id="pay_3", amount=40, policy=policy)
        budgets.reserve(s, connection_id="c", payment_id="pay_3", amount=40, policy=policy)
        rows = s.execute(select(Reservation).where(Reservation.payment_id == "pay_3")).scalars()
        assert [r.amount for r in rows] == [40]  # idempotent per payment: one reservation
    with pytest.raises(PolicyRefused) as info, transaction(engine) as s:
        budgets.reserve(s, connection_id="c", payment_id="pay_4", amount=1, policy=policy)
    assert info.value.rule == "budget.week"


def _escrow_event(name: str, amount: int, i: int) -> EscrowEvent:
    return EscrowEvent(name=name, amount=amount, tx_hash=f"0x{i:064x}", block_number=i, log_index=0)


def test_escrow_returns_reach_the_budget_exactly_once_under_racing_appliers(
    engine: Engine,
) -> None:
    """Workers (reconcilers, a job's retry, an action) apply the same escrow events to one
    outgoing payment at once: the budget gets the voided part back once, the captured part stays
    spent, and each escrow event becomes one connector event."""
    policy = SpendingPolicy(budget_day="1000")
    payment = Payment(
        id=new_id("pay"),
        connection_id="conn_e",
        direction="outgoing",
        state="created",
        amount=400,
        asset="0x" + "11" * 20,
        network="eip155:31337",
        payer="0x" + "22" * 20,
        payee="0x" + "33" * 20,
        scheme="authCapture",
    )
    with transaction(engine) as s:
        insert_payment(s, payment, then=[Step(PaymentState.SETTLING)])
        budgets.reserve(s, connection_id="conn_e", payment_id=payment.id, amount=400, policy=policy)
    events = [
        _escrow_event("PaymentAuthorized", 400, 1),
        _escrow_event("PaymentCaptured", 150, 2),
        _escrow_event("PaymentVoided", 250, 3),
    ]
    rt = cast(Runtime, SimpleNamespace(engine=engine))
    start = threading.Barrier(6 if engine.dialect.name == "postgresql" else 3)

    def applier(upto: int) -> None:
        with transaction(engine) as s:
            mine = s.get(Payment, payment.id)
        assert mine is not None
        start.wait()
        # losing every retry to the others is allowed: the final apply below catches up
        with contextlib.suppress(ConcurrentUpdate):
            escrow_sync.apply(rt, mine, events[:upto], confirmed_through=None)

    workers = [threading.Thread(target=applier, args=(1 + i % 3,)) for i in range(start.parties)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    # whatever the race left, the rest
    escrow_sync.apply(rt, payment, events, confirmed_through=None)
    with transaction(engine) as s:
        final = s.get(Payment, payment.id)
        row = s.execute(
            select(Reservation).where(Reservation.payment_id == payment.id)
        ).scalar_one()
        types = list(s.execute(select(Event.type).where(Event.payment_id == payment.id)).scalars())
        room = budgets.usage(s, "conn_e", policy)[0].remaining
    assert final is not None and final.state == "captured" and final.captured_amount == 150
    assert (row.status, row.amount, room) == ("confirmed", 150, 850)
    assert sorted(types) == sorted(
        ["payment.created", "payment.settling", "payment.authorized", "payment.captured",
         "payment.voided"]
    )  # fmt: skip
