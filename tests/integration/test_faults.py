"""Issue 10: money safety under faults, on the real stack (PostgreSQL, anvil, our facilitator on
loopback HTTP). Each test makes one fault, then checks the money invariants
(:func:`tests.fixtures.faults.money_invariants`).

* a slow chain (mining paused): a submitted transaction is an unknown outcome, never a failure;
* a payment marked failed by an earlier version and paid later is corrected by reconcile;
* refunds and the paywall under a slow chain;
* reconcile and a job's retry racing on one payment (``ConcurrentUpdate``);
* a PostgreSQL connection dropped in the middle of a job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import event, text

from connector.payments import maintenance
from connector.payments.driver import drive
from connector.storage.db import transaction
from tests.fixtures.faults import (
    FaultRig,
    count_events,
    money_invariants,
    wait_until,
    worker_runtime_of,
)

pytestmark = [pytest.mark.chain, pytest.mark.postgres]


def later(minutes: int = 5) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


@contextmanager
def before_statement(
    rig: FaultRig, match: str, action: Any, *, times: int = 1, any_thread: bool = False
) -> Iterator[None]:
    """Run ``action()`` just before this thread's next statement containing ``match`` is sent:
    a deterministic way to put another worker's work (or a fault) between two statements."""
    me = threading.get_ident()
    left = [times]

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        mine = any_thread or threading.get_ident() == me
        if left[0] > 0 and mine and match in statement:
            left[0] -= 1
            action()

    event.listen(rig.rt.engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(rig.rt.engine, "before_cursor_execute", hook)


# ------------------------------------------------------------------------- item 1: slow chain


def test_slow_chain_keeps_the_payment_settling_and_the_budget_held(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    payee = accounts[12].address
    conn = rig.connection(accounts[5], {"budget_day": "1000"})
    rig.pause_mining()
    first = rig.job(conn, "send", {"to": payee, "amount": "600"})
    rig.run(first)
    paying = rig.payment_of(first)
    # The facilitator submitted the transaction and gave up waiting: unknown, not failed.
    assert paying.state == "settling", (paying.state, paying.failure_reason)
    assert paying.tx_hash
    assert rig.reservation(paying.id) == "held"
    assert rig.job_row(first).status not in ("succeeded", "failed")
    # reconcile while the chain is still paused: drives it again, never fails it
    maintenance.reconcile(rig.rt, now=later(2))
    assert rig.payment(paying.id).state == "settling"
    # the budget still counts the first payment: a second one over the limit is refused
    second = rig.job(conn, "send", {"to": payee, "amount": "600"})
    rig.run(second)
    assert rig.payment_of(second).state == "rejected"
    rig.resume_mining()
    assert rig.run(first) == "succeeded"
    settled = rig.payment(paying.id)
    assert settled.state == "settled" and settled.tx_hash == paying.tx_hash
    assert rig.reservation(paying.id) == "confirmed"
    assert rig.job_row(first).result["payment"]["state"] == "settled"  # type: ignore[index]
    maintenance.reconcile(rig.rt, now=later())
    assert money_invariants(rig, {conn: 1000}) == []


def test_reconcile_settles_a_pending_payment_without_its_job(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[6], {"budget_day": "1000"})
    rig.pause_mining()
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "700"})
    rig.run(job)
    payment = rig.payment_of(job)
    assert payment.state == "settling"
    rig.resume_mining()
    assert maintenance.reconcile(rig.rt, now=later(2)) >= 1
    assert rig.payment(payment.id).state == "settled"
    assert rig.reservation(payment.id) == "confirmed"
    assert rig.run(job) == "succeeded"  # the job's own retry reports the truth
    assert money_invariants(rig, {conn: 1000}) == []


def test_a_payment_failed_earlier_but_paid_later_is_corrected(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """Rows an earlier version wrote: failed, reservation released, job succeeded with the
    failed payment — then the transaction was mined. Reconcile must find and correct them."""
    conn = rig.connection(accounts[7], {"budget_day": "1000"})
    rig.pause_mining()
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "400"})
    rig.run(job)
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
        s.execute(
            text("UPDATE jobs SET status='succeeded', result=CAST(:r AS json) WHERE id=:j"),
            {"j": job, "r": '{"payment": {"state": "failed"}, "response": null}'},
        )
    rig.resume_mining()
    assert rig.client.authorization_state(payment.asset, payment.payer, payment.nonce)
    maintenance.reconcile(rig.rt, now=later(2))
    corrected = rig.payment(payment.id)
    assert corrected.state == "settled"
    assert rig.reservation(payment.id) == "confirmed"
    assert count_events(rig, "payment.settled_late", payment.id) == 1
    assert money_invariants(rig, {conn: 1000}) == []
    maintenance.reconcile(rig.rt, now=later(3))  # once is enough: no second event
    assert count_events(rig, "payment.settled_late", payment.id) == 1


# ------------------------------------------------------ item 1: refunds and paywall, slow chain


def _paid_incoming(rig: FaultRig, seller: str, payer: LocalAccount, amount: int) -> Any:
    """An incoming payment made through the seller's paywall; returns (payment, header)."""
    from connector.actions.schemas import ReceiveInput
    from connector.payments import protocol as proto
    from connector.payments import receive
    from connector.payments.context_loader import load_connection
    from connector.x402 import exact_evm as exact
    from connector.x402.codec import build_payment_payload

    ctx = load_connection(rig.rt, seller)
    request = receive.create_request(
        rig.rt, ctx, ReceiveInput.model_validate({"amount": str(amount)})
    )
    requirement = receive._requirement(rig.rt, request)
    signed = exact.sign_exact(payer, requirement)
    wire = build_payment_payload(signed.payload, requirement, 2)
    name, value = proto.payment_header(2, wire)
    answer = receive.handle_paywall(rig.rt, ctx, request.id, {name: value})
    return answer, {name: value}, request.id


def test_paywall_on_a_slow_chain_keeps_the_payment_and_delivers_on_replay(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    from connector.payments import receive
    from connector.payments.context_loader import load_connection

    seller = rig.connection(accounts[8])
    rig.pause_mining()
    answer, header, request_id = _paid_incoming(rig, seller, accounts[4], 250)
    assert answer.status not in (200, 402), answer  # neither paid nor refused: pending
    assert answer.payment_id is not None
    assert rig.payment(answer.payment_id).state == "settling"
    rig.resume_mining()
    # the payer retries with the very same payment: it is delivered, nothing moves twice
    again = receive.handle_paywall(rig.rt, load_connection(rig.rt, seller), request_id, header)
    assert again.status == 200, again
    assert again.payment_id == answer.payment_id
    assert rig.payment(answer.payment_id).state == "settled"
    assert money_invariants(rig) == []


def test_refund_on_a_slow_chain_stays_in_flight_and_never_pays_twice(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    seller = rig.connection(accounts[8])
    answer, _, _ = _paid_incoming(rig, seller, accounts[4], 500)
    assert answer.status == 200
    payment_id = answer.payment_id
    rig.pause_mining()
    refund = rig.job(seller, "refund", {"payment_id": payment_id})
    rig.run(refund)
    assert rig.payment(payment_id).state == "refunding"
    # a second refund while the first one's outcome is unknown is refused, not paid
    other = rig.job(seller, "refund", {"payment_id": payment_id})
    assert rig.run(other) == "failed"
    rig.resume_mining()
    assert rig.run(refund) == "succeeded"
    assert rig.payment(payment_id).state == "refunded"
    maintenance.reconcile(rig.rt, now=later())
    assert money_invariants(rig) == []


def test_reconcile_finishes_a_pending_refund(rig: FaultRig, accounts: list[LocalAccount]) -> None:
    seller = rig.connection(accounts[8])
    answer, _, _ = _paid_incoming(rig, seller, accounts[3], 300)
    rig.pause_mining()
    refund = rig.job(seller, "refund", {"payment_id": answer.payment_id, "amount": "100"})
    rig.run(refund)
    rig.resume_mining()
    maintenance.reconcile(rig.rt, now=later(2))
    assert rig.payment(answer.payment_id).state == "partially_refunded"
    assert rig.run(refund) == "succeeded"
    assert money_invariants(rig) == []


# ------------------------------------------- item 2: reconcile and the job's retry race


def test_a_job_racing_reconcile_reports_its_payments_real_outcome(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    conn = rig.connection(accounts[5])
    rig.facilitator_down()
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "900"})
    rig.run(job)  # facilitator unreachable: payment settling, job waits for its retry
    payment = rig.payment_of(job)
    assert payment.state == "settling"
    rig.facilitator_up()
    # reconcile's drive_payment settles the payment between the job's read and its write
    competitor = threading.Thread(target=drive, args=(rig.rt, payment.id))

    def race() -> None:
        competitor.start()
        competitor.join(timeout=30)

    with before_statement(rig, "UPDATE payments", race):
        status = rig.run(job)
    assert rig.payment(payment.id).state == "settled"
    assert status == "succeeded", rig.job_row(job).error
    assert rig.job_row(job).result["payment"]["state"] == "settled"  # type: ignore[index]
    assert money_invariants(rig) == []


# ------------------------------------------------------ item 9: a database connection drops


def test_task_retries_at_once_when_its_database_connection_drops(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """The connection dies after the money moved, before the payment is recorded settled: the
    task retries within seconds (no wait for beat) and reports the settled payment."""
    from workers.tasks import run_job as run_job_task

    conn = rig.connection(accounts[6])
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "321"})
    dropped: list[int] = []
    with (
        worker_runtime_of(rig),
        before_statement(
            rig, "UPDATE payments", lambda: dropped.append(rig.drop_db_connections()), times=1
        ),
    ):
        # the first payment UPDATE of a direct send is its final one (settled)
        result = run_job_task.apply(args=[job])
    assert dropped and dropped[0] >= 1
    assert result.successful(), result.traceback
    assert rig.job_row(job).status == "succeeded"
    assert rig.payment_of(job).state == "settled"
    assert money_invariants(rig) == []


def test_api_answers_503_with_retry_after_when_the_connection_drops(rig: FaultRig) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from connector import admin_keys

    with transaction(rig.rt.engine) as s:
        _, key = admin_keys.create_key(s, name="t", scopes=["admin"])
    client = TestClient(create_app(runtime=rig.rt), raise_server_exceptions=False)
    auth = {"authorization": f"Bearer {key}"}
    assert client.get("/v1/admin/connections", headers=auth).status_code == 200
    # the request's own statement finds its connection gone: 503 + Retry-After, never a 500
    with before_statement(rig, "FROM connections", rig.drop_db_connections, any_thread=True):
        response = client.get("/v1/admin/connections", headers=auth)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/database_unavailable")
    # authentication is a read plus a touch: it is simply run again on a new connection
    with before_statement(rig, "FROM admin_keys", rig.drop_db_connections, any_thread=True):
        assert client.get("/v1/admin/connections", headers=auth).status_code == 200
    assert wait_until(
        lambda: client.get("/v1/admin/connections", headers=auth).status_code == 200, 10
    )


# ------------------------------------------------------------- item 10: beat is visible


def test_beat_tasks_record_ticks_and_healthz_reports_the_last_one(rig: FaultRig) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from workers.tasks import reconcile_payments

    client = TestClient(create_app(runtime=rig.rt))
    # Health probes run off the request path (an answer may carry the previous result), so
    # wait for the check to have run rather than expect it in the very first answer.
    assert wait_until(lambda: client.get("/healthz").json()["checks"]["beat"]["status"] == "down")
    before = client.get("/healthz").json()
    assert before["beat"] == {"last_tick_at": None, "age_s": None, "ok": False}
    with worker_runtime_of(rig):
        reconcile_payments.apply()
    assert wait_until(lambda: client.get("/healthz").json()["beat"]["ok"] is True)
    beat = client.get("/healthz").json()["beat"]
    assert beat["ok"] is True and beat["last_tick_at"] is not None
    assert datetime.fromisoformat(beat["last_tick_at"]) > datetime.now(UTC) - timedelta(minutes=1)


def test_visibility_timeout_defaults_to_minutes_and_exceeds_the_task_time_limit() -> None:
    from connector.jobs import job_lease
    from connector.settings import Settings
    from workers.celery_app import make_celery

    settings = Settings(broker_url="redis://127.0.0.1:6379/15")
    assert settings.broker_visibility_timeout_s <= 600
    assert settings.broker_visibility_timeout_s > settings.task_time_limit_s
    # a killed worker's redelivered task finds its job's lease expired, so it can take it over
    assert settings.broker_visibility_timeout_s > job_lease(settings).total_seconds()
    options = make_celery(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == settings.broker_visibility_timeout_s


def test_escrow_release_on_a_slow_chain_is_pending_not_failed(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    from connector.actions.schemas import ReceiveInput
    from connector.payments import protocol as proto
    from connector.payments import receive
    from connector.payments.context_loader import load_connection
    from connector.x402 import exact_evm as exact
    from connector.x402.codec import build_payment_payload

    escrow = rig.connection(accounts[8])
    beneficiary = accounts[15].address
    ctx = load_connection(rig.rt, escrow)
    request = receive.create_request(
        rig.rt,
        ctx,
        ReceiveInput.model_validate(
            {"amount": "600", "custodial": True, "beneficiary": beneficiary}
        ),
    )
    requirement = receive._requirement(rig.rt, request)
    wire = build_payment_payload(exact.sign_exact(accounts[4], requirement).payload, requirement, 2)
    name, value = proto.payment_header(2, wire)
    paid = receive.handle_paywall(rig.rt, ctx, request.id, {name: value})
    assert paid.status == 200 and paid.payment_id
    before = rig.client.token_balance(rig.chain.token, beneficiary)
    rig.pause_mining()
    release = rig.job(escrow, "release", {"payment_id": paid.payment_id})
    status = rig.run(release)
    assert status not in ("succeeded", "failed"), rig.job_row(release).error
    assert rig.payment(paid.payment_id).state == "settled"  # not released yet, not failed
    rig.resume_mining()
    assert rig.run(release) == "succeeded"
    payment = rig.payment(paid.payment_id)
    assert payment.state == "released" and payment.release_tx_hash
    assert rig.client.token_balance(rig.chain.token, beneficiary) == before + 600
    assert money_invariants(rig) == []
