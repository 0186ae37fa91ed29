"""The job contract, action by action: succeeded only when the action did what was asked; failed
with a typed problem otherwise; requires_approval / pending while the outcome is not known."""

from __future__ import annotations

from typing import Any

import pytest

from connector.actions import outcome
from connector.actions.outcome import SEND_STATUS, outcome_of
from connector.errors import (
    Conflict,
    ConnectorError,
    ExternalServiceError,
    NotFound,
    PolicyRefused,
    ValidationFailed,
)
from connector.payments.states import TERMINAL, PaymentState


def payment(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "pay_1",
        "state": state,
        "failure_code": None,
        "failure_reason": None,
        "custodial": False,
        **extra,
    }


def send(state: str, **extra: Any) -> dict[str, Any]:
    return {"payment": payment(state, **extra), "response": None}


def test_every_payment_state_has_a_job_status() -> None:
    assert set(SEND_STATUS) == set(PaymentState)
    # a payment that can still move is never reported final, and never as failed
    for state in ("created", "authorized", "settling"):
        assert SEND_STATUS[PaymentState(state)] == "pending"
    # a final payment gives a final job
    for state in TERMINAL:
        assert SEND_STATUS[state] in outcome.TERMINAL


def test_send_success_and_dry_run_succeed() -> None:
    assert outcome_of("send", send("settled")).status == "succeeded"
    assert outcome_of("send", send("simulated")).status == "succeeded"
    done = outcome_of("send", send("settled"))
    assert done.error is None and done.result == send("settled")


@pytest.mark.parametrize(
    "rule", ["max_per_payment", "domain_allow", "budget.day", "payee_deny", "max_amount"]
)
def test_send_refused_by_policy_fails_naming_the_rule(rule: str) -> None:
    found = outcome_of(
        "send", send("rejected", failure_code=rule, failure_reason=f"refused by {rule}")
    )
    assert found.status == "failed"
    assert found.error is not None
    assert found.error["code"] == "policy_refused" and found.error["rule"] == rule
    assert found.error["retryable"] is False and found.error["payment_id"] == "pay_1"
    assert found.error["type"].endswith("/policy_refused") and found.error["status"] == 403
    assert found.result is not None and found.result["payment"]["state"] == "rejected"


def test_send_waiting_for_approval_is_not_final() -> None:
    found = outcome_of("send", send("requires_approval"))
    assert (found.status, found.error) == ("requires_approval", None)
    assert found.status not in outcome.TERMINAL


def test_approval_rejected_and_expired_fail() -> None:
    rejected = outcome_of("send", send("rejected", failure_code="approval_rejected"))
    assert rejected.status == "failed" and rejected.error is not None
    assert rejected.error["code"] == "approval_rejected" and "rule" not in rejected.error
    expired = outcome_of("send", send("expired"))
    assert expired.status == "failed" and expired.error is not None
    assert expired.error["code"] == "payment_expired"


def test_send_definite_failure_fails_with_the_payment_reason() -> None:
    found = outcome_of(
        "send", send("failed", failure_code="settlement_failed", failure_reason="insufficient")
    )
    assert found.status == "failed" and found.error is not None
    assert (found.error["code"], found.error["detail"]) == ("settlement_failed", "insufficient")
    assert found.error["retryable"] is False


def test_send_unknown_outcome_is_pending_never_failed() -> None:
    assert outcome_of("send", send("settling")).status == "pending"


@pytest.mark.parametrize(
    ("status", "final", "retryable"),
    [(200, "succeeded", None), (304, "succeeded", None), (410, "failed", False),
     (404, "failed", False), (429, "failed", True), (503, "failed", True)],
)  # fmt: skip
def test_send_to_a_url_that_asks_no_payment(status: int, final: str, retryable: bool) -> None:
    result = {"payment": None, "response": {"status": status, "headers": {}, "body": ""}}
    found = outcome_of("send", result)
    assert found.status == final and found.result == result
    if final == "failed":
        assert found.error is not None
        assert found.error["code"] == "http_error" and found.error["response_status"] == status
        assert found.error["retryable"] is retryable


def test_release_outcomes() -> None:
    assert outcome_of("release", {"payment": payment("settled")}).status == "succeeded"
    assert outcome_of("release", {"payment": payment("released")}).status == "succeeded"
    assert outcome_of("release", {"payment": payment("settling")}).status == "pending"
    forwarded_not_yet = outcome_of("release", {"payment": payment("settled", custodial=True)})
    assert forwarded_not_yet.status == "pending"
    failed = outcome_of("release", {"payment": payment("failed", failure_code="settlement_failed")})
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "settlement_failed"


def test_void_outcomes() -> None:
    assert outcome_of("void", {"payment": payment("voided")}).status == "succeeded"


def refund(state: str) -> dict[str, Any]:
    return {
        "refund": {
            "id": "ref_1",
            "payment_id": "pay_1",
            "amount": "5",
            "state": state,
            "tx_hash": None,
            "failure_reason": "nope" if state == "failed" else None,
        },
        "payment": payment("settled"),
    }


def test_refund_outcomes() -> None:
    assert outcome_of("refund", refund("succeeded")).status == "succeeded"
    assert outcome_of("refund", refund("settling")).status == "pending"
    assert outcome_of("refund", refund("pending")).status == "pending"
    failed = outcome_of("refund", refund("failed"))
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error["code"], failed.error["refund_id"]) == ("refund_failed", "ref_1")


def test_receive_verify_balance_answer_means_done() -> None:
    assert outcome_of("receive", {"payment_request": {"id": "prq_1"}}).status == "succeeded"
    # an invalid payment is a successful verification whose answer is "no": branch on `valid`
    assert outcome_of("verify", {"valid": False, "reason": "x"}).status == "succeeded"
    assert outcome_of("balance", {"balance": "1"}).status == "succeeded"


@pytest.mark.parametrize(
    ("error", "code", "retryable", "rule"),
    [
        (PolicyRefused("no", rule="domain_deny"), "policy_refused", False, "domain_deny"),
        (ValidationFailed("bad", field="amount"), "validation_failed", False, None),
        (Conflict("state"), "conflict", False, None),
        (NotFound("gone"), "not_found", False, None),
        (ExternalServiceError("down"), "external_service_error", True, None),
    ],
)
def test_raised_errors_become_typed_problems(
    error: ConnectorError, code: str, retryable: bool, rule: str | None
) -> None:
    body = outcome.problem_from_error(error)
    assert (body["code"], body["retryable"], body.get("rule")) == (code, retryable, rule)
    assert body["type"] == outcome.PROBLEM_BASE + code


def _escrow_send(state: str, collected: bool, **ledger: str) -> dict[str, Any]:
    escrow = (
        {"collected": collected, "held": "0", "reclaimed": "0", **ledger} if collected else None
    )
    return send(state, direction="outgoing", scheme="authCapture", escrow=escrow)


@pytest.mark.parametrize("state", ["authorized", "captured", "voided", "reclaimed", "refunded"])
def test_an_escrow_send_the_escrow_collected_succeeded_whatever_came_next(state: str) -> None:
    # the send paid into escrow as asked; the seller's void or the payer's reclaim later does
    # not turn it into a failure
    found = outcome_of("send", _escrow_send(state, collected=True))
    assert (found.status, found.error) == ("succeeded", None)


def test_an_escrow_send_only_signed_is_pending() -> None:
    # ``authorized`` before the escrow collected anything (e.g. just approved): not paid yet
    assert outcome_of("send", _escrow_send("authorized", collected=False)).status == "pending"
    assert outcome_of("send", _escrow_send("settling", collected=False)).status == "pending"
    failed = outcome_of("send", _escrow_send("failed", collected=False))
    assert failed.status == "failed"


def test_reclaim_succeeds_when_nothing_is_held_and_something_came_back() -> None:
    done = {"payment": payment("captured", escrow={"held": "0", "reclaimed": "300"})}
    assert outcome_of("reclaim", done).status == "succeeded"
    still = {"payment": payment("authorized", escrow={"held": "300", "reclaimed": "0"})}
    assert outcome_of("reclaim", still).status == "pending"
    voided = {"payment": payment("voided", escrow={"held": "0", "reclaimed": "0"})}
    assert outcome_of("reclaim", voided).status == "pending"


def test_an_escrow_refusal_carries_its_reason() -> None:
    from connector.errors import EscrowRefused

    body = outcome.problem_from_error(
        EscrowRefused("too early", reason="before_authorization_expiry", payment_id="pay_1")
    )
    assert body["code"] == "escrow_refused" and body["status"] == 409
    assert body["reason"] == "before_authorization_expiry" and body["retryable"] is False
