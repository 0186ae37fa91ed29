"""A chain reorganization after a ``send`` finished: the job follows its payment's truth.

On the real stack (anvil, our facilitator over loopback HTTP, SQLite and PostgreSQL): a direct
send settles and its job finishes ``succeeded``; then the block with the settlement is reverted
(``evm_revert``), the recheck finds the receipt gone and puts the payment back to ``settling``.

* re-settled (with a new transaction): the job stays ``succeeded`` and its result shows the new
  transaction hash, as the payment does;
* never settled again (the authorization expired meanwhile): the payment ends ``failed`` and the
  job turns ``failed`` with ``settlement_reverted``;
* re-included by another transaction (found by the recheck): the job shows that transaction.

While the payment is being settled again the job is still ``succeeded`` (final statuses do not
go back to waiting) and its result shows the payment as it is: ``settling``, no hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from connector.chain import ChainClient
from connector.payments import maintenance
from connector.payments.confirmations import recheck_settlements
from connector.payments.driver import drive
from connector.storage.db import transaction
from connector.storage.models.events import Event
from tests.fixtures.faults import FaultRig, count_events, money_invariants

pytestmark = [pytest.mark.chain]


def later(minutes: int = 5) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def settled_send(rig: FaultRig, payer: LocalAccount, payee: str) -> tuple[str, str, str, str]:
    """A direct send that settles inside a chain snapshot. Returns the connection, the job, the
    payment and the snapshot to revert to (which removes the settlement's block)."""
    conn = rig.connection(payer, {"budget_day": "10000"})
    snapshot = str(rig.client.rpc("evm_snapshot", []))
    job = rig.job(conn, "send", {"to": payee, "amount": "1500"})
    assert rig.run(job) == "succeeded"
    payment = rig.payment_of(job)
    assert payment.state == "settled" and payment.tx_hash
    shown = rig.job_row(job).result["payment"]  # type: ignore[index]
    assert shown["tx_hash"] == payment.tx_hash
    return conn, job, payment.id, snapshot


def settling_events(rig: FaultRig, payment_id: str) -> list[str | None]:
    """``vanished_tx_hash`` of each ``payment.settling`` event that a reorg caused."""
    with transaction(rig.rt.engine) as s:
        rows = s.execute(
            select(Event).where(Event.payment_id == payment_id, Event.type == "payment.settling")
        ).scalars()
        data = [row.payload["data"] for row in rows]
    return [d["vanished_tx_hash"] for d in data if "vanished_tx_hash" in d]


def reorg(rig: FaultRig, snapshot: str) -> None:
    """The settlement's block is gone (as in a reorganization); the gas key's cached nonces
    with it."""
    assert rig.client.rpc("evm_revert", [snapshot])
    ChainClient.forget_all_nonces()


def test_a_reorg_then_a_new_settlement_keeps_the_job_succeeded_with_the_new_hash(
    any_rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    rig = any_rig
    conn, job, payment_id, snapshot = settled_send(rig, accounts[4], accounts[13].address)
    first_tx = rig.payment(payment_id).tx_hash
    reorg(rig, snapshot)

    assert recheck_settlements(rig.rt) == 1
    paying = rig.payment(payment_id)
    assert paying.state == "settling" and paying.tx_hash is None
    row = rig.job_row(job)
    # Still succeeded (a final status does not go back to waiting), but no longer claiming a
    # settlement that the chain no longer has.
    assert row.status == "succeeded"
    assert row.result["payment"]["state"] == "settling"  # type: ignore[index]
    assert row.result["payment"]["tx_hash"] is None  # type: ignore[index]
    # the money may still move: the budget counts it, as held again
    assert rig.reservation(payment_id) == "held"
    assert money_invariants(rig, {conn: 10000}, settled_only=False) == []

    # The facilitator's gas key has sent something else meanwhile: the same authorization goes
    # out in a new transaction with a new hash.
    rig.client.send_transaction(rig.gas_key, rig.gas_key.address, "0x", gas=21_000)
    maintenance.reconcile(rig.rt, now=later(2))
    assert ("x402c.drive_payment", (payment_id,)) in rig.dispatched
    assert drive(rig.rt, payment_id) == "settled"

    settled = rig.payment(payment_id)
    assert settled.tx_hash and settled.tx_hash != first_tx
    row = rig.job_row(job)
    assert row.status == "succeeded" and row.error is None
    assert row.result["payment"]["state"] == "settled"  # type: ignore[index]
    assert row.result["payment"]["tx_hash"] == settled.tx_hash  # type: ignore[index]
    assert count_events(rig, "payment.settled", payment_id) == 2
    assert money_invariants(rig, {conn: 10000}) == []


def test_a_reorg_then_an_expired_authorization_fails_the_job(
    any_rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    rig = any_rig
    conn, job, payment_id, snapshot = settled_send(rig, accounts[5], accounts[13].address)
    first_tx = rig.payment(payment_id).tx_hash
    reorg(rig, snapshot)
    assert recheck_settlements(rig.rt) == 1
    assert rig.job_row(job).status == "succeeded"

    # The authorization's deadline passes before anyone settles it again (wall clock and chain).
    deadline = rig.payment(payment_id).valid_before
    assert deadline is not None
    deadline = deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)
    rig.client.rpc("evm_mine", [])
    behind = int(deadline.timestamp()) - rig.client.latest_block_timestamp()
    rig.client.rpc("evm_increaseTime", [max(behind, 0) + 30])
    rig.client.rpc("evm_mine", [])
    maintenance.reconcile(rig.rt, now=deadline + timedelta(minutes=2))

    failed = rig.payment(payment_id)
    assert failed.state == "failed" and failed.failure_code == "authorization_expired"
    row = rig.job_row(job)
    assert row.status == "failed", row
    assert row.error is not None and row.error["code"] == "settlement_reverted"
    assert row.error["retryable"] is False and row.error["payment_id"] == payment_id
    assert row.error["failure_code"] == "authorization_expired"
    # the vanished transaction is named by the payment's own event (webhooks)
    assert settling_events(rig, payment_id) == [first_tx]
    assert row.result["payment"]["state"] == "failed"  # type: ignore[index]
    assert count_events(rig, "payment.failed", payment_id) == 1
    assert rig.reservation(payment_id) == "released"  # no money moved: the budget has it back
    assert money_invariants(rig, {conn: 10000}) == []


def test_a_settlement_reincluded_by_another_transaction_is_shown_by_the_job(
    any_rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    rig = any_rig
    conn, job, payment_id, snapshot = settled_send(rig, accounts[6], accounts[13].address)
    first_tx = rig.payment(payment_id).tx_hash
    reorg(rig, snapshot)
    # Someone (here: the facilitator, asked again) puts the same authorization on the new chain
    # in another transaction before the recheck looks.
    rig.client.send_transaction(rig.gas_key, rig.gas_key.address, "0x", gas=21_000)
    payment = rig.payment(payment_id)
    assert payment.signed_payload is not None and payment.requirement is not None
    answer = rig.rt.facilitator(rig.facilitator_url, None).settle(
        payment.signed_payload, payment.requirement
    )
    other = answer["transaction"]
    assert answer["success"] and other and other != first_tx

    assert recheck_settlements(rig.rt) == 0  # nothing went back to settling: it is settled
    payment = rig.payment(payment_id)
    assert payment.state == "settled" and payment.tx_hash == other
    row = rig.job_row(job)
    assert row.status == "succeeded"
    assert row.result["payment"]["tx_hash"] == other  # type: ignore[index]
    assert settling_events(rig, payment_id) == [first_tx]
    assert count_events(rig, "payment.settled", payment_id) == 2
    assert rig.reservation(payment_id) == "confirmed"
    assert money_invariants(rig, {conn: 10000}) == []


def test_a_send_that_settles_looks_up_no_jobs_by_payment(
    any_rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """The send's happy path pays nothing for jobs following their payment: the job records
    its own outcome; only payments that move again after their job finished look jobs up."""
    rig = any_rig
    conn = rig.connection(accounts[7])
    job = rig.job(conn, "send", {"to": accounts[13].address, "amount": "10"})
    with statements(rig.rt.engine) as seen:
        assert rig.run(job) == "succeeded"
    lookups = [s for s in seen if "jobs.payment_id =" in s.replace("\n", " ")]
    assert lookups == []
