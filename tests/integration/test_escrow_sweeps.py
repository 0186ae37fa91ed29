"""The periodic sweeps leave funded escrow payments to the chain (SQLite and PostgreSQL).

An outgoing ``authCapture`` payment in ``authorized`` is either only signed (nothing left the
payer: it expires at its ``validBefore`` like any other) or held by the escrow contract (its
``validBefore`` was the deadline to *collect*; the hold now ends on-chain, at the capture
deadline and the payer's reclaim, which reconciliation reads). The ledger tells them apart.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.ids import new_id
from connector.payments import escrow_ledger, maintenance
from connector.payments.machine import Step, insert_payment
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.policy.rules import SpendingPolicy
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.models.payments import Payment, Reservation
from connector.x402.auth_capture import EscrowEvent

S = PaymentState


def _payment(engine: Engine, *, funded: bool) -> str:
    past = datetime.now(UTC) - timedelta(minutes=10)
    payment = Payment(
        id=new_id("pay"),
        connection_id="conn_s",
        direction="outgoing",
        state="created",
        amount=500,
        asset="0x" + "11" * 20,
        network="eip155:31337",
        payer="0x" + "22" * 20,
        payee="0x" + "33" * 20,
        scheme="authCapture",
        nonce="0x" + secrets.token_hex(32),
        valid_before=past,  # the collection's deadline (preApprovalExpiry) has passed
    )
    with transaction(engine) as s:
        steps = [Step(S.SETTLING)] if funded else [Step(S.AUTHORIZED)]
        insert_payment(s, payment, then=steps)
        budgets.reserve(
            s, connection_id="conn_s", payment_id=payment.id, amount=500,
            policy=SpendingPolicy(budget_day="1000"),
        )  # fmt: skip
        if funded:
            held = EscrowEvent("PaymentAuthorized", 500, "0x" + "cd" * 32, 7, 3)
            escrow_ledger.apply_escrow_events(s, payment, [held], confirmed_through=None)
    return payment.id


def test_a_funded_escrow_hold_is_not_expired_by_the_sweep(engine: Engine) -> None:
    rt = cast(Runtime, SimpleNamespace(engine=engine))
    funded = _payment(engine, funded=True)
    signed_only = _payment(engine, funded=False)
    assert maintenance.expire_holds(rt) == 1
    with transaction(engine) as s:
        held = s.get(Payment, funded)
        unused = s.get(Payment, signed_only)
        statuses = dict(
            s.execute(select(Reservation.payment_id, Reservation.status)).tuples().all()
        )
    assert held is not None and held.state == "authorized"
    assert held.escrow is not None and held.escrow["from_block"] == 7
    assert statuses[funded] == "held"  # still in the escrow: still counts
    assert unused is not None and unused.state == "expired"
    assert statuses[signed_only] == "released"
