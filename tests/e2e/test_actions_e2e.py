"""Every action end to end through the API, the Celery worker, anvil and the facilitator, with
balances read back on-chain."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from api.stack import Stack
from connector import admin_keys
from connector.storage.db import transaction
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


@pytest.fixture(scope="module")
def buyer(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[3], {"max_per_payment": "5000000"})


@pytest.fixture(scope="module")
def seller(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[4])


def offer(seller: Agent, amount: int, **extra: Any) -> dict[str, Any]:
    result = seller.run("receive", {"amount": str(amount), "resource": {"secret": "42"}, **extra})
    request: dict[str, Any] = result["payment_request"]
    return request


def incoming(seller: Agent, state: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = seller.http.get(
        "/v1/admin/payments",
        params={"connection_id": seller.connection_id, "state": state, "direction": "incoming"},
    ).json()["data"]
    return data


def test_send_pays_a_paywall_and_money_moves(buyer: Agent, seller: Agent) -> None:
    before = buyer.balance(), seller.balance()
    request = offer(seller, 12_345)
    result = buyer.run("send", {"url": request["url"]})
    assert result["payment"]["state"] == "settled"
    assert result["response"]["status"] == 200 and '"42"' in result["response"]["body"]
    assert (buyer.balance(), seller.balance()) == (before[0] - 12_345, before[1] + 12_345)
    # a single-use offer refuses a second payment before any money moves: the job FAILS (the
    # action did not get the resource), it does not report success with a 410 hidden inside
    again = buyer.job("send", {"url": request["url"]})
    assert again["status"] == "failed", again
    assert again["result"]["payment"] is None and again["result"]["response"]["status"] == 410
    error = again["error"]
    assert (error["code"], error["response_status"], error["retryable"]) == (
        "http_error",
        410,
        False,
    )
    assert (buyer.balance(), seller.balance()) == (before[0] - 12_345, before[1] + 12_345)


def test_direct_payment_to_an_address(buyer: Agent, seller: Agent) -> None:
    before = seller.balance()
    result = buyer.run("send", {"to": seller.account.address, "amount": "777"})
    assert result["payment"]["state"] == "settled" and result["payment"]["tx_hash"]
    assert seller.balance() == before + 777


def test_manual_capture_hold_then_void_moves_nothing(buyer: Agent, seller: Agent) -> None:
    before = buyer.balance(), seller.balance()
    request = offer(seller, 5_000, capture="manual", scheme="exact")
    job = buyer.job("send", {"url": request["url"]})
    # the payee holds the authorization: the money's fate is not known, so the job is pending
    # (not final, never failed) with the delivered response already in its result
    assert job["status"] == "pending" and job["error"] is None, job
    sent = job["result"]
    assert sent["payment"]["state"] == "settling" and sent["response"]["status"] == 200
    held = [p for p in incoming(seller, "authorized") if p["amount"] == "5000"]
    assert len(held) == 1 and held[0]["hold_expires_at"]
    voided = seller.run("void", {"payment_id": held[0]["id"]})
    assert voided["payment"]["state"] == "voided"
    assert (buyer.balance(), seller.balance()) == before
    # a voided hold cannot be released: 409-style failure naming the transition
    error = seller.fail("release", {"payment_id": held[0]["id"]})
    assert error["status"] == 409 and error["type"].endswith("/illegal_transition")


def test_custodial_escrow_release_pays_the_beneficiary(
    buyer: Agent, seller: Agent, stack: Stack
) -> None:
    beneficiary = stack.accounts[12].address
    from connector.chain import ChainClient

    chain = ChainClient(stack.chain.rpc_url)
    before = chain.token_balance(stack.chain.token, beneficiary)
    request = offer(seller, 9_000, custodial=True, beneficiary=beneficiary)
    assert buyer.run("send", {"url": request["url"]})["payment"]["state"] == "settled"
    settled = [p for p in incoming(seller, "settled") if p["amount"] == "9000"]
    released = seller.run("release", {"payment_id": settled[0]["id"]})["payment"]
    assert released["state"] == "released"
    assert chain.token_balance(stack.chain.token, beneficiary) == before + 9_000


def test_partial_refunds_never_exceed_what_settled(buyer: Agent, seller: Agent) -> None:
    request = offer(seller, 10_000)
    buyer.run("send", {"url": request["url"]})
    payment = next(p for p in incoming(seller, "settled") if p["amount"] == "10000")
    before = buyer.balance()
    first = seller.run("refund", {"payment_id": payment["id"], "amount": "4000"})
    assert first["payment"]["state"] == "partially_refunded"
    too_much = seller.fail("refund", {"payment_id": payment["id"], "amount": "6001"})
    assert too_much["status"] == 422
    rest = seller.run("refund", {"payment_id": payment["id"]})
    assert rest["refund"]["amount"] == "6000" and rest["payment"]["state"] == "refunded"
    assert buyer.balance() == before + 10_000
    nothing = seller.fail("refund", {"payment_id": payment["id"], "amount": "1"})
    assert nothing["status"] == 409


def test_verify_payload_and_transaction(buyer: Agent, seller: Agent, stack: Stack) -> None:
    from connector.x402 import exact_evm
    from connector.x402.codec import build_payment_payload
    from connector.x402.requirement import Requirement

    requirement = Requirement(
        scheme="exact", network=stack.chain.network, amount=55, asset=stack.chain.token,
        pay_to=seller.account.address, max_timeout_seconds=120,
        extra={"name": stack.chain.token_name, "version": stack.chain.token_version},
    )  # fmt: skip
    wire = build_payment_payload(
        exact_evm.sign_exact(buyer.account, requirement).payload, requirement, 2
    )
    good = buyer.run("verify", {"payment_payload": wire, "requirements": requirement.to_v2()})
    assert good == {**good, "valid": True, "payer": buyer.account.address}
    bad_req = {**requirement.to_v2(), "amount": "56"}
    bad = buyer.run("verify", {"payment_payload": wire, "requirements": bad_req})
    assert bad["valid"] is False and bad["reason"].endswith("value_mismatch")
    tx = buyer.run("send", {"to": seller.account.address, "amount": "31"})["payment"]["tx_hash"]
    on_chain = buyer.run(
        "verify", {"tx_hash": tx, "expected_to": seller.account.address, "expected_amount": "31"}
    )
    assert on_chain["valid"] and on_chain["transfers"][0]["value"] == "31"
    wrong = buyer.run("verify", {"tx_hash": tx, "expected_amount": "32"})
    assert wrong["valid"] is False and wrong["reason"] == "no_matching_transfer"


def test_balance_and_history(buyer: Agent) -> None:
    result = buyer.run("balance", {"history_limit": 3})
    assert int(result["balance"]) == buyer.balance()
    assert result["address"] == buyer.account.address and len(result["history"]) <= 3


def test_policy_refusals_and_dry_run(stack: Stack, seller: Agent) -> None:
    careful = make_agent(
        stack,
        stack.accounts[5],
        {"max_per_payment": "1000", "payee_deny": [stack.accounts[13].address]},
    )
    too_big_job = careful.job("send", {"to": seller.account.address, "amount": "1001"})
    assert too_big_job["status"] == "failed", too_big_job
    error = too_big_job["error"]
    assert (error["code"], error["rule"], error["retryable"]) == (
        "policy_refused",
        "max_per_payment",
        False,
    )
    too_big = too_big_job["result"]["payment"]
    assert (too_big["state"], too_big["failure_code"]) == ("rejected", "max_per_payment")
    assert error["payment_id"] == too_big["id"] == too_big_job["payment_id"]
    denied = careful.fail("send", {"to": stack.accounts[13].address, "amount": "1"})
    assert (denied["code"], denied["rule"]) == ("policy_refused", "payee_deny")
    before = careful.balance()
    dry = careful.run("send", {"to": seller.account.address, "amount": "10", "dry_run": True})
    assert dry["payment"]["state"] == "simulated" and careful.balance() == before


def test_approval_by_two_admins_then_payment_runs(stack: Stack, seller: Agent) -> None:
    big = make_agent(
        stack, stack.accounts[6], {"approval_threshold": "100", "approvals_required": 2}
    )
    # with ?wait=30 the call answers at once: waiting for people is not worth blocking on
    job = big.job("send", {"to": seller.account.address, "amount": "150"}, wait=30)
    assert job["status"] == "requires_approval" and job["error"] is None, job
    waiting = job["result"]["payment"]
    assert waiting["state"] == "requires_approval"
    # Two people: each key names its own principal, as the CLI makes them (a key minted through
    # the API would inherit the bootstrap key's principal and count as the same person).
    keys = []
    with transaction(stack.runtime.engine) as session:
        for name in ("alice", "bob"):
            keys.append(
                admin_keys.create_key(session, name=name, scopes=["admin"], principal=name)[1]
            )
    before = seller.balance()
    first = big.http.post(
        f"/v1/admin/payments/{waiting['id']}/approve",
        json={},
        headers={"authorization": f"Bearer {keys[0]}"},
    ).json()
    assert first["state"] == "requires_approval"
    again = big.http.post(
        f"/v1/admin/payments/{waiting['id']}/approve",
        json={},
        headers={"authorization": f"Bearer {keys[0]}"},
    )
    assert again.status_code == 409  # the same admin cannot approve twice
    second = big.http.post(
        f"/v1/admin/payments/{waiting['id']}/approve",
        json={},
        headers={"authorization": f"Bearer {keys[1]}"},
    ).json()
    assert second["state"] == "authorized"
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and seller.balance() == before:
        time.sleep(0.05)
    assert seller.balance() == before + 150
    # the job followed its payment to the end: succeeded, with the settled payment
    done = big.wait_job(job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded" and done["error"] is None, done
    assert done["result"]["payment"]["state"] == "settled"


def test_a_rejected_approval_fails_the_waiting_job(stack: Stack, seller: Agent) -> None:
    big = make_agent(stack, stack.accounts[7], {"approval_threshold": "100"})
    job = big.job("send", {"to": seller.account.address, "amount": "120"}, wait=0)
    job = big.wait_job(job["id"], ("requires_approval", "succeeded", "failed"))
    assert job["status"] == "requires_approval", job
    rejected = big.http.post(
        f"/v1/admin/payments/{job['payment_id']}/reject", json={"note": "too much"}
    )
    assert rejected.status_code == 200, rejected.text
    # the same transaction that rejected the payment failed the job: no polling needed
    done = big.http.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "failed", done
    assert (done["error"]["code"], done["error"]["retryable"]) == ("approval_rejected", False)
    assert done["result"]["payment"]["state"] == "rejected"


def test_reconciler_settles_the_buyer_side_after_capture_and_expires_holds(
    buyer: Agent, seller: Agent, stack: Stack
) -> None:
    from datetime import UTC, datetime, timedelta

    from connector.payments import maintenance

    request = offer(seller, 3_333, capture="manual", scheme="exact")
    job = buyer.job("send", {"url": request["url"]})
    sent = job["result"]["payment"]
    assert sent["state"] == "settling" and job["status"] == "pending"
    held = next(p for p in incoming(seller, "authorized") if p["amount"] == "3333")
    seller.run("release", {"payment_id": held["id"]})
    later = datetime.now(UTC) + timedelta(minutes=2)
    assert maintenance.reconcile(stack.runtime, now=later) >= 1
    after = buyer.http.get(f"/v1/admin/payments/{sent['id']}").json()
    assert after["state"] == "settled"  # the chain shows the nonce used: money moved
    # the pending job followed the payment in the reconciler's transaction
    done = buyer.http.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["result"]["payment"]["state"] == "settled"

    request2 = offer(seller, 4_444, capture="manual", scheme="exact")
    assert buyer.job("send", {"url": request2["url"]})["status"] == "pending"
    hold = next(p for p in incoming(seller, "authorized") if p["amount"] == "4444")
    deadline = datetime.fromisoformat(hold["hold_expires_at"])
    maintenance.expire_holds(stack.runtime, now=deadline - timedelta(minutes=1))
    events = buyer.http.get("/v1/admin/events", params={"type": "payment.hold_expiring"}).json()
    assert any(e["data"]["payment"]["id"] == hold["id"] for e in events["data"])
    assert maintenance.expire_holds(stack.runtime, now=deadline + timedelta(seconds=1)) >= 1
    assert buyer.http.get(f"/v1/admin/payments/{hold['id']}").json()["state"] == "expired"


def test_a_crash_while_recording_a_settlement_never_pays_twice(
    buyer: Agent, seller: Agent, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's result commits with the payment's final state. If that transaction dies after
    the facilitator settled, both roll back together; the retry finds the same payment in
    ``settling``, reuses the stored authorization and records it once: money moves once."""
    from sqlalchemy import select

    import connector.actions.service as service
    from connector.jobs import start_job
    from connector.storage.db import transaction
    from connector.storage.models.payments import Job, Payment

    rt = stack.runtime
    before = seller.balance()
    with transaction(rt.engine) as s:
        job_id = start_job(
            s,
            connection_id=buyer.connection_id,
            action="send",
            body={"to": seller.account.address, "amount": "4321"},
            idempotency_key="crash-" + uuid.uuid4().hex,
        ).job.id

    real = service.outcome.write

    def crash_on_success(session: Any, job: str, found: Any, **kw: Any) -> bool:
        if job == job_id and found.status == "succeeded":
            raise RuntimeError("worker died while committing")
        return real(session, job, found, **kw)

    monkeypatch.setattr(service.outcome, "write", crash_on_success)
    with pytest.raises(RuntimeError):
        service.run_job(rt, job_id)
    monkeypatch.setattr(service.outcome, "write", real)
    assert seller.balance() == before + 4321  # the facilitator did settle
    with transaction(rt.engine) as s:
        job = s.get(Job, job_id)
        # not an outcome: back in the queue with the reason (the sweep sends it again)
        assert job is not None and job.status == "queued" and job.payment_id
        assert job.error is not None and job.error["code"] == "internal_error"
        payment = s.get(Payment, job.payment_id)
        assert payment is not None and payment.state == "settling"  # rolled back together

    result = service.run_job(rt, job_id)  # what the task retry does
    assert result is not None and result["payment"]["state"] == "settled"
    assert result["payment"]["id"] == payment.id
    assert seller.balance() == before + 4321  # not a second time
    with transaction(rt.engine) as s:
        mine = s.execute(select(Payment).where(Payment.idempotency_key == job_id)).scalars().all()
        assert len(mine) == 1 and mine[0].settle_attempts == 2
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded" and job.result == result


def _queue_send(stack: Stack, buyer: Agent, seller: Agent, amount: str) -> str:
    from connector.jobs import start_job
    from connector.storage.db import transaction

    with transaction(stack.runtime.engine) as s:
        return start_job(
            s,
            connection_id=buyer.connection_id,
            action="send",
            body={"to": seller.account.address, "amount": amount},
            idempotency_key="queued-" + uuid.uuid4().hex,
        ).job.id


def _job_status(stack: Stack, job_id: str) -> tuple[str, int, str | None]:
    from connector.storage.db import transaction
    from connector.storage.models.payments import Job

    with transaction(stack.runtime.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.status, job.attempts, job.payment_id


def test_a_first_direct_send_commits_its_claim_with_the_payment(
    buyer: Agent, seller: Agent, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim and the signed payment share one transaction: if it dies, neither exists (the
    job is still queued, nothing was signed into the database), and the retry pays once."""
    import connector.payments.send as send
    from connector.actions import service

    rt = stack.runtime
    rt.chain(stack.chain.rpc_url).token_domain(stack.chain.token)  # known: no network call first
    before = seller.balance()
    job_id = _queue_send(stack, buyer, seller, "777")

    def dies(*_: Any, **__: Any) -> None:
        raise RuntimeError("worker died before commit")

    real = send.link_payment
    monkeypatch.setattr(send, "link_payment", dies)
    with pytest.raises(RuntimeError):
        service.run_job(rt, job_id)
    assert _job_status(stack, job_id) == ("queued", 0, None)
    monkeypatch.setattr(send, "link_payment", real)

    result = service.run_job(rt, job_id)
    assert result is not None and result["payment"]["state"] == "settled"
    assert _job_status(stack, job_id) == ("succeeded", 1, result["payment"]["id"])
    assert seller.balance() == before + 777


def test_a_statement_the_database_refuses_puts_the_job_back_in_the_queue_with_the_reason(
    buyer: Agent, seller: Agent, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose code does not match the schema (here: a column the table lacks) must not
    leave the job `running` with no trace after its claim was committed (the token domain was
    read first): the job is `queued` again with an `internal_error`, and runs once fixed."""
    from sqlalchemy.exc import ProgrammingError

    import connector.payments.send as send
    from connector.actions import service
    from connector.storage.db import transaction
    from connector.storage.models.payments import Job

    rt = stack.runtime
    chain = rt.chain(stack.chain.rpc_url)
    monkeypatch.setattr(chain, "_domains", {})  # the claim commits before the domain is read
    before = seller.balance()
    job_id = _queue_send(stack, buyer, seller, "31")
    real = send.insert_payment

    def stale_schema(session: Any, *args: Any, **kwargs: Any) -> Any:
        # What PostgreSQL answers an INSERT naming a column the table lacks (UndefinedColumn).
        raise ProgrammingError(
            "INSERT INTO payments (no_such_column) VALUES (%(x)s)",
            {"x": "a signed authorization"},
            Exception('column "no_such_column" of relation "payments" does not exist'),
        )

    monkeypatch.setattr(send, "insert_payment", stale_schema)
    with pytest.raises(ProgrammingError):
        service.run_job(rt, job_id)
    with transaction(rt.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.attempts, job.payment_id) == ("queued", 1, None)
        assert job.error is not None and job.error["code"] == "internal_error"
        assert job.error["retryable"] is True and "ProgrammingError" in job.error["detail"]
        assert "authorization" not in str(job.error)  # never the statement or its parameters
    assert seller.balance() == before  # nothing was signed into the database, nothing moved

    monkeypatch.setattr(send, "insert_payment", real)
    result = service.run_job(rt, job_id)  # what the stale-job sweep's requeue does
    assert result is not None and result["payment"]["state"] == "settled"
    assert _job_status(stack, job_id)[:2] == ("succeeded", 2)
    assert seller.balance() == before + 31


def test_the_claim_is_committed_before_the_token_domain_is_read_from_the_chain(
    buyer: Agent, seller: Agent, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.actions import service

    rt = stack.runtime
    chain = rt.chain(stack.chain.rpc_url)
    job_id = _queue_send(stack, buyer, seller, "5")
    seen: list[tuple[str, int, str | None]] = []
    real = chain.token_domain

    def observing(asset: str) -> tuple[str, str]:
        seen.append(_job_status(stack, job_id))  # from another connection: committed state only
        return real(asset)

    monkeypatch.setattr(chain, "_domains", {})  # forget the domain: this send must read it
    monkeypatch.setattr(chain, "token_domain", observing)
    result = service.run_job(rt, job_id)
    assert result is not None and result["payment"]["state"] == "settled"
    assert seen and seen[0][:2] == ("running", 1)  # no transaction was open across the RPC


def test_definite_failures_of_the_other_actions_are_failed_with_a_typed_problem(
    buyer: Agent, seller: Agent
) -> None:
    """receive, release, void, refund and verify: a refusal is `failed` (final, HTTP 200) with a
    problem whose `code` and `retryable` a workflow can branch on — never `succeeded`."""
    bad_network = seller.fail("receive", {"amount": "5", "network": "not-a-network"})
    assert (bad_network["code"], bad_network["retryable"]) == ("validation_failed", False)
    assert bad_network["field"] == "network"
    missing = "pay_" + "0" * 26
    for action in ("release", "void", "refund"):
        error = seller.fail(action, {"payment_id": missing})
        assert (error["code"], error["status"], error["retryable"]) == ("not_found", 404, False)
    # a settled (not held) payment cannot be voided: the state machine says why
    request = offer(seller, 1_111)
    buyer.run("send", {"url": request["url"]})
    settled = next(p for p in incoming(seller, "settled") if p["amount"] == "1111")
    refused = seller.fail("void", {"payment_id": settled["id"]})
    assert (refused["code"], refused["retryable"]) == ("illegal_transition", False)
    # verify: a transaction that does not exist is a successful check whose answer is "no"
    answer = buyer.run("verify", {"tx_hash": "0x" + "11" * 32})
    assert (answer["valid"], answer["reason"]) == (False, "transaction_not_found")
