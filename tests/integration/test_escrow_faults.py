"""Issue 15 under the faults of issue 10: on-chain escrow (``authCapture``) operations on a chain
whose mining is paused (``evm_setAutomine false``), then reconcile. Each test ends with the money
invariants (:func:`tests.fixtures.faults.money_invariants`): every escrow payment's ledger equals
the escrow's events and ``paymentState``, no job disagrees with its payment, no budget overspent.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain.auth_capture import EscrowClient
from connector.payments import escrow_onchain, maintenance
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import chain_now, travel
from tests.fixtures.faults import FaultRig, count_events, money_invariants
from tests.integration.test_escrow_reconcile import reservation_row, shop, spent

pytestmark = [pytest.mark.chain, pytest.mark.postgres]


def later(minutes: int = 5) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def escrow_of(rig: FaultRig, payment_id: str) -> ac.EscrowState:
    info, deployment = escrow_onchain.terms_of(rig.payment(payment_id))
    return EscrowClient(rig.client, deployment).state(info)


def test_paused_mining_during_escrow_operations_then_reconcile_agrees_with_the_chain(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[5], {"budget_day": "60000"})
    with shop(rig, accounts[12].address, amount=40_000) as seller:
        # the collection: submitted by the seller's facilitator, no receipt
        rig.pause_mining()
        job = rig.job(conn, "send", {"url": seller.url})
        rig.run(job)
        paying = rig.payment_of(job)
        assert paying.state == "settling", (paying.state, paying.failure_reason)
        assert paying.tx_hash == seller.seen[0]["transaction"]
        assert rig.reservation(paying.id) == "held"
        assert rig.job_row(job).status not in ("succeeded", "failed")
        maintenance.reconcile(rig.rt, now=later(2))  # still paused: nothing decided
        assert rig.payment(paying.id).state == "settling"
        # the budget still counts it: a second payment over the limit is refused
        other = rig.job(conn, "send", {"url": seller.url})
        assert rig.run(other) == "failed" and rig.payment_of(other).state == "rejected"
        rig.resume_mining()
        maintenance.reconcile(rig.rt, now=later(2))
        held = rig.payment(paying.id)
        assert held.state == "authorized" and held.tx_hash == paying.tx_hash
        assert escrow_of(rig, held.id) == ac.EscrowState(True, 40_000, 0)
        assert rig.run(job) == "succeeded"  # its retry reports the truth, sends nothing
        assert len(seller.seen) == 1

        # a capture by the operator on a paused chain: pending at the facilitator
        rig.pause_mining()
        pending = seller.operate(held, "capture", amount="25000")
        assert pending["success"] is False and pending["errorReason"] == "settlement_pending"
        maintenance.reconcile(rig.rt, now=later(3))
        assert rig.payment(held.id).state == "authorized"  # not mined: nothing to apply
        rig.resume_mining()
        maintenance.reconcile(rig.rt, now=later(3))
        captured = rig.payment(held.id)
        assert captured.state == "captured" and captured.captured_amount == 25_000
        assert (reservation_row(rig, held.id).status, spent(rig, conn)) == ("held", 40_000)

        # a void on a paused chain, then mined
        rig.pause_mining()
        assert seller.operate(held, "void")["errorReason"] == "settlement_pending"
        rig.resume_mining()
        maintenance.reconcile(rig.rt, now=later(4))
    assert escrow_of(rig, held.id) == ac.EscrowState(True, 0, 25_000)
    row = reservation_row(rig, held.id)
    assert (row.status, row.amount, spent(rig, conn)) == ("confirmed", 25_000, 25_000)
    assert [count_events(rig, t, held.id) for t in ("payment.captured", "payment.voided")] == [
        1,
        1,
    ]
    assert money_invariants(rig, {conn: 60_000}) == []


def test_a_reclaim_on_a_paused_chain_is_pending_then_recorded_once(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    buyer = accounts[9]
    conn = rig.connection(buyer, {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=20_000, capture_in=90, max_timeout_seconds=60) as s:
        job = rig.job(conn, "send", {"url": s.url})
        assert rig.run(job) == "succeeded"
    payment = rig.payment_of(job)
    info, _ = escrow_onchain.terms_of(payment)
    travel(rig.client, info.authorization_expiry - chain_now(rig.client) + 1)
    balance = rig.client.token_balance(rig.chain.token, buyer.address)
    # the reclaim's transaction gets no receipt: an unknown outcome, retried, never failed
    rig.pause_mining()
    reclaim = rig.job(conn, "reclaim", {"payment_id": payment.id})
    status = rig.run(reclaim)
    assert status == "queued", rig.job_row(reclaim).error
    assert (rig.job_row(reclaim).error or {})["code"] == "settlement_pending"
    assert rig.payment(payment.id).state == "authorized"
    assert rig.reservation(payment.id) == "held"
    rig.resume_mining()
    maintenance.reconcile(rig.rt, now=later())  # the reclaim's event, picked up
    assert rig.payment(payment.id).state == "reclaimed"
    assert rig.reservation(payment.id) == "released"
    assert rig.run(reclaim) == "succeeded"  # the retry sees it done and sends nothing
    assert rig.client.token_balance(rig.chain.token, buyer.address) == balance + 20_000
    assert count_events(rig, "payment.reclaimed", payment.id) == 1
    assert money_invariants(rig, {conn: 100_000}) == []


def test_reconcile_and_the_jobs_retry_racing_on_one_escrow_payment_count_once(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[6], {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=30_000) as seller:
        rig.pause_mining()
        job = rig.job(conn, "send", {"url": seller.url})
        rig.run(job)
        payment = rig.payment_of(job)
        rig.resume_mining()
        assert seller.operate(payment, "void")["success"]  # mined with the collection's block
        # the job's retry and two reconcilers apply the same escrow events at once
        runs = [
            threading.Thread(target=rig.run, args=(job,)),
            threading.Thread(target=maintenance.reconcile, args=(rig.rt, later(2))),
            threading.Thread(target=maintenance.reconcile, args=(rig.rt, later(2))),
        ]
        for t in runs:
            t.start()
        for t in runs:
            t.join(timeout=60)
        maintenance.reconcile(rig.rt, now=later(3))
        rig.run(job)
    final = rig.payment(payment.id)
    assert final.state == "voided"
    assert [count_events(rig, t, payment.id) for t in ("payment.authorized", "payment.voided")] == [
        1,
        1,
    ]
    assert rig.reservation(payment.id) == "released" and spent(rig, conn) == 0
    assert rig.job_row(job).status == "succeeded"
    assert money_invariants(rig, {conn: 100_000}) == []
