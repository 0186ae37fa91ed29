"""Budgets hold under concurrency: many parallel reservations never exceed the limit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.errors import PolicyRefused
from connector.ids import new_id
from connector.policy import budgets
from connector.policy.rules import SpendingPolicy
from connector.storage.db import transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Reservation


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
