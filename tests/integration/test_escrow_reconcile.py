"""On-chain escrow (``authCapture``) payments follow the escrow contract (issue 15, items 5-6 and
the payer side), on the real stack: PostgreSQL, the session anvil (snapshot/revert) with our
escrow at the canonical addresses, our facilitator over loopback HTTP as the operator, and a
seller's resource server that offers ``authCapture``.

* ``send`` ends ``authorized`` (held) or ``captured`` (charged), not ``settled``;
* reconcile picks up what the operator or the payer did outside the connector (capture, void,
  reclaim), one connector event per escrow event, and cross-checks ``paymentState``;
* the payer's budget counts what is held or captured and gets back what is voided or reclaimed;
* the ``reclaim`` action; a collection whose authorization expired unused fails;
* an incoming escrow payment (the paywall side's record) is reconciled the same way.

Every test ends with the money invariants (chain == database, jobs agree, budgets kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import select, text

from connector.chain.abi import MINT, call_data
from connector.chain.auth_capture import EscrowClient
from connector.metrics import ESCROW_MISMATCHES
from connector.payments import escrow_onchain, maintenance
from connector.payments import protocol as proto
from connector.payments.machine import Step, insert_payment
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.policy.rules import SpendingPolicy
from connector.storage.db import transaction
from connector.storage.models.events import Event
from connector.storage.models.payments import Payment, Reservation
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import (
    approve,
    chain_now,
    escrow_shop,
    operator_settle,
    requirement,
    travel,
    wall_now,
)
from tests.fixtures.faults import FaultRig, count_events, money_invariants
from tests.fixtures.servers import LiveServer

pytestmark = [pytest.mark.chain, pytest.mark.postgres]


def later(minutes: int = 5) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


class Shop:
    """A seller whose server offers one ``authCapture`` requirement; the rig's facilitator
    (its gas key) is the escrow operator."""

    def __init__(self, rig: FaultRig, seller: str, **terms: Any) -> None:
        auto = terms.pop("auto_capture", False)
        self.rig = rig
        self.req = requirement(
            rig.chain, operator=rig.gas_key.address, pay_to=seller, now=wall_now(), **terms
        ).to_v2()
        if auto:
            self.req["extra"] = {**self.req["extra"], "autoCapture": True}
        self.seen: list[dict[str, Any]] = []
        self.down = [False]
        self.server = LiveServer(
            escrow_shop(rig.facilitator_url, self.req, self.seen, down=self.down)
        )

    @property
    def url(self) -> str:
        return self.server.url + "/held"

    def operate(self, payment: Payment, kind: str, **fields: str) -> dict[str, Any]:
        info, _ = escrow_onchain.terms_of(payment)
        inner = {"type": kind, "paymentInfo": info.to_wire(), **fields}
        return operator_settle(self.rig.facilitator_url, self.req, inner)


@contextmanager
def shop(rig: FaultRig, seller: str, **terms: Any) -> Iterator[Shop]:
    s = Shop(rig, seller, **terms)
    with s.server:
        yield s


def pay(rig: FaultRig, conn: str, url: str) -> tuple[str, str]:
    job = rig.job(conn, "send", {"url": url})
    return job, rig.run(job)


def reservation_row(rig: FaultRig, payment_id: str) -> Reservation:
    with transaction(rig.rt.engine) as s:
        row = s.execute(
            select(Reservation).where(Reservation.payment_id == payment_id)
        ).scalar_one()
        return row


def spent(rig: FaultRig, conn: str) -> int:
    with transaction(rig.rt.engine) as s:
        usage = budgets.usage(s, conn, SpendingPolicy(budget_day="1"))
    return usage[0].spent


def event_types(rig: FaultRig, payment_id: str) -> list[str]:
    with transaction(rig.rt.engine) as s:
        rows = s.execute(
            select(Event.type).where(Event.payment_id == payment_id).order_by(Event.id)
        ).scalars()
        return list(rows)


def escrow_state(rig: FaultRig, payment: Payment) -> ac.EscrowState:
    info, deployment = escrow_onchain.terms_of(payment)
    return EscrowClient(rig.client, deployment).state(info)


# ----------------------------------------------------------------------- send and reconcile


def test_send_holds_in_escrow_and_reconcile_follows_capture_and_void_done_elsewhere(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[5], {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=40_000) as seller:
        job, status = pay(rig, conn, seller.url)
        assert status == "succeeded"
        payment = rig.payment_of(job)
        assert payment.state == "authorized" and payment.tx_hash == seller.seen[0]["transaction"]
        assert payment.escrow is not None and payment.escrow["held"] == "40000"
        assert rig.job_row(job).result["payment"]["state"] == "authorized"  # type: ignore[index]
        row = reservation_row(rig, payment.id)
        assert (row.status, row.amount) == ("held", 40_000)  # may still come back: reserved

        assert seller.operate(payment, "capture", amount="25000")["success"]
        assert maintenance.reconcile(rig.rt, now=later()) == 1
        payment = rig.payment(payment.id)
        assert payment.state == "captured" and payment.captured_amount == 25_000
        row = reservation_row(rig, payment.id)
        assert (row.status, row.amount) == ("held", 40_000)  # 15000 held + 25000 captured

        assert seller.operate(payment, "void")["success"]
        maintenance.reconcile(rig.rt, now=later())
        payment = rig.payment(payment.id)
        assert payment.state == "captured"  # headline unchanged, the void is recorded
        assert payment.escrow is not None and payment.escrow["voided"] == "15000"
        row = reservation_row(rig, payment.id)
        assert (row.status, row.amount) == ("confirmed", 25_000)  # only the voided rest back
        assert spent(rig, conn) == 25_000

    # one connector event per escrow event, in chain order; the collection went to the seller
    # at once (no "authorized" before the escrow held anything)
    assert event_types(rig, payment.id) == [
        "payment.created",
        "payment.settling",
        "payment.authorized",
        "payment.captured",
        "payment.voided",
    ]
    assert maintenance.reconcile(rig.rt, now=later()) == 0  # nothing new: nothing written
    assert count_events(rig, "payment.voided", payment.id) == 1
    assert rig.job_row(job).status == "succeeded"  # paid into escrow: stays succeeded
    assert money_invariants(rig, {conn: 100_000}) == []


def test_a_void_gives_the_budget_room_back_exactly_once(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[6], {"budget_day": "50000"})
    with shop(rig, accounts[12].address, amount=40_000) as seller:
        first, status = pay(rig, conn, seller.url)
        assert status == "succeeded"
        held = rig.payment_of(first)
        # the escrowed 40000 counts: a second one does not fit
        second, status = pay(rig, conn, seller.url)
        assert status == "failed" and rig.payment_of(second).state == "rejected"
        assert seller.operate(held, "void")["success"]
        maintenance.reconcile(rig.rt, now=later())
        maintenance.reconcile(rig.rt, now=later())  # twice: given back once
        assert rig.payment(held.id).state == "voided"
        assert reservation_row(rig, held.id).status == "released"
        assert spent(rig, conn) == 0
        third, status = pay(rig, conn, seller.url)
        assert status == "succeeded" and rig.payment_of(third).state == "authorized"
        assert spent(rig, conn) == 40_000
    assert rig.job_row(first).status == "succeeded"  # it did pay; the seller gave it back
    assert money_invariants(rig, {conn: 50_000}) == []


def test_concurrent_escrow_sends_and_voids_never_overspend_the_budget(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """Six sends race for a budget that holds three escrowed payments; then voids give room
    back while more sends race for it. What the escrow holds or paid out never exceeds it."""
    conn = rig.connection(accounts[7], {"budget_day": "100000"})

    def race(seller: Shop, n: int) -> list[str]:
        jobs = [rig.job(conn, "send", {"url": seller.url}) for _ in range(n)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(rig.run, jobs))
        return jobs

    with shop(rig, accounts[12].address, amount=30_000) as seller:
        first = race(seller, 6)
        funded = [j for j in first if rig.job_row(j).status == "succeeded"]
        assert len(funded) == 3, [rig.job_row(j).status for j in first]
        assert spent(rig, conn) == 90_000
        for job in funded[:2]:
            assert seller.operate(rig.payment_of(job), "void")["success"]
        second = race(seller, 4)
        with ThreadPoolExecutor(2) as pool:  # reconcilers racing the sends' own work
            list(pool.map(lambda _: maintenance.reconcile(rig.rt, now=later()), range(2)))
        third = race(seller, 4)
        states = [rig.payment_of(j).state for j in first + second + third]
        # 1 left from the first race; the second raced before reconcile saw the voids (budget
        # still full: nothing fits), the third after: exactly the 2 voided slots
        assert (states.count("voided"), states.count("authorized")) == (2, 3), states
        assert spent(rig, conn) == 90_000
        # sends racing the reconcilers that give a voided payment's room back
        assert seller.operate(_an_authorized(rig, third), "void")["success"]
        fourth = [rig.job(conn, "send", {"url": seller.url}) for _ in range(3)]
        with ThreadPoolExecutor(5) as pool:
            work = [pool.submit(rig.run, j) for j in fourth]
            work += [pool.submit(maintenance.reconcile, rig.rt, later()) for _ in range(2)]
            for w in work:
                w.result()
        assert spent(rig, conn) <= 90_000
    maintenance.reconcile(rig.rt, now=later())
    assert money_invariants(rig, {conn: 100_000}) == []


def _an_authorized(rig: FaultRig, jobs: list[str]) -> Payment:
    return next(p for p in map(rig.payment_of, jobs) if p.state == "authorized")


def test_a_charge_ends_captured_and_counts_as_spent(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[7], {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=30_000, auto_capture=True) as seller:
        job, status = pay(rig, conn, seller.url)
    assert status == "succeeded"
    assert seller.seen[0]["operation"] == "charge"
    payment = rig.payment_of(job)
    assert payment.state == "captured" and payment.captured_amount == 30_000
    row = reservation_row(rig, payment.id)
    assert (row.status, row.amount) == ("confirmed", 30_000)
    assert escrow_state(rig, payment) == ac.EscrowState(True, 0, 30_000)
    assert money_invariants(rig, {conn: 100_000}) == []


def test_reconcile_flags_a_ledger_that_disagrees_with_payment_state(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[5])
    with shop(rig, accounts[12].address, amount=10_000) as seller:
        job, _ = pay(rig, conn, seller.url)
    payment = rig.payment_of(job)
    # a ledger that lies (an applied event that a reorganization removed, a hand edit)
    with transaction(rig.rt.engine) as s:
        s.execute(
            text(
                "UPDATE payments SET escrow = CAST(:e AS json), version = version + 1 WHERE id = :p"
            ),
            {"e": _json({**(payment.escrow or {}), "held": "9000"}), "p": payment.id},
        )
    ledger_before = ESCROW_MISMATCHES.labels(kind="ledger")._value.get()
    events_before = ESCROW_MISMATCHES.labels(kind="events")._value.get()
    maintenance.reconcile(rig.rt, now=later())
    assert ESCROW_MISMATCHES.labels(kind="ledger")._value.get() == ledger_before + 1
    assert ESCROW_MISMATCHES.labels(kind="events")._value.get() == events_before  # chain agrees
    assert money_invariants(rig) != []  # and the invariant check sees it too


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


# --------------------------------------------------------------------------- reclaim


def test_the_payer_reclaims_after_the_capture_deadline_and_the_budget_gets_it_back(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    buyer = accounts[8]
    conn = rig.connection(buyer, {"budget_day": "100000"})
    with shop(
        rig, accounts[12].address, amount=40_000, capture_in=90, max_timeout_seconds=60
    ) as seller:
        job, _ = pay(rig, conn, seller.url)
        payment = rig.payment_of(job)
        assert seller.operate(payment, "capture", amount="10000")["success"]
    balance = rig.client.token_balance(rig.chain.token, buyer.address)

    early = rig.job(conn, "reclaim", {"payment_id": payment.id})
    assert rig.run(early) == "failed"
    error = rig.job_row(early).error or {}
    assert error["code"] == "escrow_refused" and error["reason"] == "before_authorization_expiry"
    assert error["retryable"] is False
    assert rig.client.token_balance(rig.chain.token, buyer.address) == balance  # nothing sent

    info, _ = escrow_onchain.terms_of(payment)
    travel(rig.client, info.authorization_expiry - chain_now(rig.client) + 1)
    reclaim = rig.job(conn, "reclaim", {"payment_id": payment.id})
    assert rig.run(reclaim) == "succeeded"
    reclaimed = rig.payment(payment.id)
    # the operator's capture (done outside the connector) was read first, then the reclaim
    assert reclaimed.state == "captured" and reclaimed.captured_amount == 10_000
    assert reclaimed.escrow is not None and reclaimed.escrow["reclaimed"] == "30000"
    assert rig.client.token_balance(rig.chain.token, buyer.address) == balance + 30_000
    row = reservation_row(rig, payment.id)
    assert (row.status, row.amount) == ("confirmed", 10_000)
    result = rig.job_row(reclaim).result or {}
    assert result["payment"]["escrow"]["held"] == "0"

    # again (a retry, another node): answered from the escrow, nothing sent
    again = rig.job(conn, "reclaim", {"payment_id": payment.id})
    assert rig.run(again) == "succeeded"
    assert rig.client.token_balance(rig.chain.token, buyer.address) == balance + 30_000
    assert count_events(rig, "payment.reclaimed", payment.id) == 1
    assert money_invariants(rig, {conn: 100_000}) == []


def test_a_reclaim_done_from_the_wallet_outside_the_connector_is_picked_up(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    buyer = accounts[9]
    conn = rig.connection(buyer, {"budget_day": "100000"})
    with shop(
        rig, accounts[12].address, amount=20_000, capture_in=90, max_timeout_seconds=60
    ) as seller:
        job, _ = pay(rig, conn, seller.url)
    payment = rig.payment_of(job)
    info, _ = escrow_onchain.terms_of(payment)
    travel(rig.client, info.authorization_expiry - chain_now(rig.client) + 1)
    escrow_onchain.reclaim(rig.client, buyer, payment)  # the payer's own wallet, directly
    maintenance.reconcile(rig.rt, now=later())
    assert rig.payment(payment.id).state == "reclaimed"
    assert reservation_row(rig, payment.id).status == "released"
    assert spent(rig, conn) == 0
    assert money_invariants(rig, {conn: 100_000}) == []


def test_reclaim_refuses_what_is_not_an_outgoing_escrow_payment(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[5])
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "100"})
    assert rig.run(job) == "succeeded"
    reclaim = rig.job(conn, "reclaim", {"payment_id": rig.payment_of(job).id})
    assert rig.run(reclaim) == "failed"
    assert (rig.job_row(reclaim).error or {})["code"] == "validation_failed"


# ---------------------------------------------------------------- a collection that never lands


def test_an_escrow_collection_that_never_landed_fails_only_once_its_authorization_expired(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[6], {"budget_day": "50000"})
    with shop(rig, accounts[12].address, amount=40_000, max_timeout_seconds=60) as seller:
        seller.down[0] = True  # takes the payment header and answers 503: unknown
        job, status = pay(rig, conn, seller.url)
    assert status == "queued"  # retried with the same authorization
    payment = rig.payment_of(job)
    assert payment.state == "settling" and rig.reservation(payment.id) == "held"
    maintenance.reconcile(rig.rt, now=later(2))  # before its deadline: driven again
    assert rig.payment(payment.id).state == "settling"
    assert ("x402c.drive_payment", (payment.id,)) in rig.dispatched
    assert payment.valid_before is not None
    # past the deadline by the wall clock, not yet by the chain's: still unknown
    chain_time = chain_now(rig.client)
    deadline = int(payment.valid_before.timestamp())
    if chain_time < deadline:
        maintenance.reconcile(rig.rt, now=payment.valid_before + timedelta(minutes=1))
        assert rig.payment(payment.id).state == "settling"
        travel(rig.client, deadline - chain_time + 1)
    maintenance.reconcile(rig.rt, now=payment.valid_before + timedelta(minutes=2))
    failed = rig.payment(payment.id)
    assert failed.state == "failed" and failed.failure_code == "authorization_expired"
    assert rig.reservation(payment.id) == "released"
    assert rig.run(job) == "failed"
    assert money_invariants(rig, {conn: 50_000}) == []


def test_a_failed_escrow_collection_funded_later_is_corrected(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """Rows an earlier version wrote: failed, reservation released, job failed — and then the
    collection was mined. Reconcile corrects them from the escrow's events."""
    conn = rig.connection(accounts[7], {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=15_000) as seller:
        rig.pause_mining()
        job, _ = pay(rig, conn, seller.url)
    payment = rig.payment_of(job)
    with transaction(rig.rt.engine) as s:
        s.execute(
            text(
                "UPDATE payments SET state='failed', failure_code='settlement_failed',"
                " version=version+1 WHERE id=:p"
            ),
            {"p": payment.id},
        )
        s.execute(
            text("UPDATE reservations SET status='released' WHERE payment_id=:p"), {"p": payment.id}
        )
        s.execute(text("UPDATE jobs SET status='failed' WHERE id=:j"), {"j": job})
    rig.resume_mining()
    maintenance.reconcile(rig.rt, now=later(2))
    corrected = rig.payment(payment.id)
    assert corrected.state == "authorized" and corrected.failure_code is None
    assert count_events(rig, "payment.settled_late", payment.id) == 1
    assert (rig.reservation(payment.id), spent(rig, conn)) == ("held", 15_000)
    assert rig.job_row(job).status == "succeeded"
    maintenance.reconcile(rig.rt, now=later(3))
    assert count_events(rig, "payment.settled_late", payment.id) == 1
    assert money_invariants(rig, {conn: 100_000}) == []


# ------------------------------------------------------------------------ incoming payments


def test_an_incoming_escrow_payment_is_reconciled_from_the_escrow_too(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """The paywall side's record (written here directly): funded, captured and refunded by the
    operator; reconcile gives it every operation, in order."""
    seller_conn = rig.connection(accounts[12])
    payer = accounts[4]
    req = requirement(
        rig.chain,
        operator=rig.gas_key.address,
        pay_to=accounts[12].address,
        now=wall_now(),
        amount=50_000,
        refund_in=7_200,
    )
    signed = proto.sign_payment(payer, req, 2, None)
    # as the TypeScript client pays a paywall: its authorization and salt, no paymentInfo (the
    # terms are rebuilt from the requirement, as the facilitator does)
    stored = {
        **signed.wire,
        "payload": {k: v for k, v in signed.wire["payload"].items() if k != "paymentInfo"},
    }
    payment = Payment(
        id="pay_" + "0" * 25 + "1",
        connection_id=seller_conn,
        direction="incoming",
        state="created",
        amount=req.amount,
        asset=req.asset,
        network=req.network,
        payer=payer.address,
        payee=req.pay_to,
        scheme="authCapture",
        x402_version=2,
        requirement=req.to_v2(),
        signed_payload=stored,
        nonce=signed.nonce,
        valid_before=signed.valid_before,
    )
    with transaction(rig.rt.engine) as s:
        insert_payment(s, payment, then=[Step(PaymentState.SETTLING)])
    wire = req.to_v2()
    terms = signed.wire["payload"]["paymentInfo"]
    collect = {**signed.wire["payload"], "type": "authorize"}
    assert operator_settle(rig.facilitator_url, wire, collect)["success"]
    capture = {"type": "capture", "paymentInfo": terms, "amount": "50000"}
    assert operator_settle(rig.facilitator_url, wire, capture)["success"]
    _fund_operator_refund(rig, 5_000, minter=accounts[0])
    refund = {"type": "refund", "paymentInfo": terms, "amount": "5000"}
    assert operator_settle(rig.facilitator_url, wire, refund)["success"]

    maintenance.reconcile(rig.rt, now=later(2))
    current = rig.payment(payment.id)
    assert current.state == "partially_refunded"
    assert current.refunded_amount == 5_000 and current.captured_amount == 50_000
    assert event_types(rig, payment.id)[-3:] == [
        "payment.authorized",
        "payment.captured",
        "payment.partially_refunded",
    ]
    assert escrow_state(rig, current) == ac.EscrowState(True, 0, 45_000)
    assert money_invariants(rig) == []


def _fund_operator_refund(rig: FaultRig, amount: int, minter: LocalAccount) -> None:
    """Refunds are funded by the operator through the canonical refund collector: it holds the
    tokens and approves that collector (docs/escrow.md)."""
    mint = call_data(MINT, ["address", "uint256"], [rig.gas_key.address, amount])
    assert (
        rig.client.wait_for_receipt(
            rig.client.send_transaction(minter, rig.chain.token, mint)
        ).status
        == 1
    )
    collector = ac.DEFAULT_DEPLOYMENT.operator_refund_collector
    approve(rig.client, rig.chain.token, rig.gas_key, collector, amount)


def test_an_unreadable_escrow_is_a_warning_only_when_it_persists(
    rig: FaultRig, accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """One failed read is routine (the next pass reads it) and decides nothing; the operator is
    warned once reads keep failing, and a good read resets the count."""
    import logging

    from connector.errors import ExternalServiceError

    conn = rig.connection(accounts[5])
    with shop(rig, accounts[12].address, amount=10_000) as seller:
        job, _ = pay(rig, conn, seller.url)
    payment = rig.payment_of(job)
    real = maintenance.escrow_sync.read_many

    def unreadable(*_: Any, **__: Any) -> Any:
        raise ExternalServiceError("node timed out")

    def levels() -> list[int]:
        return [
            r.levelno for r in caplog.records if r.getMessage() == "reconcile: escrow unreadable"
        ]

    caplog.set_level(logging.INFO, logger="connector")
    monkeypatch.setattr(maintenance.escrow_sync, "read_many", unreadable)
    for _ in range(maintenance.UNREADABLE_PASSES_TO_WARN):
        maintenance.reconcile(rig.rt, now=later())
    assert levels() == [logging.INFO] * (maintenance.UNREADABLE_PASSES_TO_WARN - 1) + [
        logging.WARNING
    ]
    assert rig.payment_of(job).version == payment.version  # a failed read decided nothing
    monkeypatch.setattr(maintenance.escrow_sync, "read_many", real)
    maintenance.reconcile(rig.rt, now=later())  # a good read resets the count
    monkeypatch.setattr(maintenance.escrow_sync, "read_many", unreadable)
    caplog.clear()
    maintenance.reconcile(rig.rt, now=later())
    assert levels() == [logging.INFO]
