"""The job contract: what a job's status says about its action.

A workflow builder branches on ``job.status`` alone, so the status must be the action's real
outcome, never "the code ran without raising":

* ``succeeded`` — the action did what was asked (the payment settled, the dry run was simulated,
  the offer was created, the check was made, the hold was voided…);
* ``failed`` — it did not, and ``error`` is a problem object with a stable ``code``, the ``rule``
  when the spending policy refused, and ``retryable`` (true when the same call may succeed later
  without any change: an outage, a 5xx; false when something must change first);
* ``requires_approval`` — waiting for admins to approve the payment; not final;
* ``pending`` — the money's fate is not known yet (handed to a facilitator or a payee that has
  not settled, a transaction without receipt); not final, and never reported as ``failed``;
* ``queued`` / ``running`` — not started or in progress.

A waiting job follows its payment: whichever code moves the payment on (an approval, the
reconciler, a later settle attempt) calls :func:`follow_payment` in the same transaction, so the
job's status never disagrees with the payment's state. The mapping from payment state to job
status is :data:`SEND_STATUS`; the docs' table is checked against it.

A finished ``send`` or ``release`` keeps following its payment when the chain contradicts what
it reported (docs/decisions/0013): a reorganization that removes the settlement leaves the job
``succeeded`` with its result showing the payment back in ``settling``, then settled again (new
transaction hash) or, if it can never settle any more, ``failed`` with ``settlement_reverted``;
a failed ``send`` whose money turns out to have moved becomes ``succeeded``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select
from sqlmodel import Session, SQLModel

from connector.actions import schemas as s
from connector.errors import ConnectorError, ExternalServiceError, PolicyRefused
from connector.jobs import update_job
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.storage.models.payments import Payment, Refund
from connector.x402.auth_capture import SCHEME_ALIASES

P = PaymentState
QUEUED = "queued"
RUNNING = "running"
REQUIRES_APPROVAL = "requires_approval"
PENDING = "pending"
SUCCEEDED = "succeeded"
FAILED = "failed"
#: Final statuses: no worker runs the job again. Only the chain contradicting the outcome
#: changes one (see :func:`follow_payment`): a reorganization, a late settlement.
TERMINAL = frozenset({SUCCEEDED, FAILED})
#: Not final, waiting on the payment (not on a worker): the job follows the payment.
WAITING = frozenset({REQUIRES_APPROVAL, PENDING})
#: Actions whose outcome *is* their payment's, and stays so after the job finished: a finished
#: job of these follows its payment when the chain undoes or proves a settlement. (A refund,
#: void or reclaim reports its own operation, which later moves of the payment do not undo.)
FOLLOWS_AFTER_FINISH = frozenset({"send", "release"})
JOB_STATUSES = (QUEUED, RUNNING, REQUIRES_APPROVAL, PENDING, SUCCEEDED, FAILED)
PROBLEM_BASE = "https://x402c.dev/problems/"

#: The job status of an action whose answer is a payment (send, release), by payment state.
SEND_STATUS: dict[PaymentState, str] = {
    P.CREATED: PENDING,
    P.REQUIRES_APPROVAL: REQUIRES_APPROVAL,
    P.AUTHORIZED: PENDING,
    P.SETTLING: PENDING,
    P.SETTLED: SUCCEEDED,
    P.SIMULATED: SUCCEEDED,
    P.REFUNDING: SUCCEEDED,
    P.PARTIALLY_REFUNDED: SUCCEEDED,
    P.REFUNDED: SUCCEEDED,
    P.RELEASED: SUCCEEDED,
    P.REJECTED: FAILED,
    P.FAILED: FAILED,
    P.EXPIRED: FAILED,
    P.VOIDED: FAILED,
    P.CAPTURED: SUCCEEDED,
    P.RECLAIMED: FAILED,
}

_JOBS: Table = SQLModel.metadata.tables["jobs"]


@dataclass(frozen=True)
class Outcome:
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None = None


def problem(
    code: str,
    title: str,
    status: int,
    detail: str,
    *,
    retryable: bool,
    rule: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An RFC 9457 problem object as a job's ``error`` (``code`` repeats the type's last part)."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "retryable": retryable,
    }
    if rule is not None:
        body["rule"] = rule
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def problem_from_error(exc: ConnectorError) -> dict[str, Any]:
    """A raised error as a job's ``error``. An outside service's failure may pass (retryable);
    a refusal, a conflict or bad input will not until something changes."""
    return problem(
        exc.code,
        exc.title,
        exc.status,
        exc.detail,
        retryable=isinstance(exc, ExternalServiceError),
        rule=exc.rule if isinstance(exc, PolicyRefused) else None,
        field=exc.context.get("field"),
        payment_id=exc.context.get("payment_id"),
        # the stable reason of a refusal from the chain or the protocol (an escrow revert's
        # decoded error, an authCapture verification code)
        reason=exc.context.get("reason"),
    )


def _payment_problem(payment: dict[str, Any]) -> dict[str, Any]:
    state = payment["state"]
    code = payment.get("failure_code")
    reason = payment.get("failure_reason") or f"the payment ended {state}"
    pid = payment["id"]
    if state == P.REJECTED:
        if code == "approval_rejected":
            return problem(
                "approval_rejected", "Rejected by an approver", 403, reason,
                retryable=False, payment_id=pid,
            )  # fmt: skip
        return problem(
            "policy_refused", "Refused by spending policy", 403, reason,
            retryable=False, rule=code or "policy", payment_id=pid,
        )  # fmt: skip
    if state == P.EXPIRED:
        return problem(
            "payment_expired", "The payment expired before it could settle", 409,
            reason if payment.get("failure_reason") else "the payment expired (approval or "
            "authorization deadline passed) and nothing moved",
            retryable=False, payment_id=pid,
        )  # fmt: skip
    if state == P.VOIDED:
        return problem(
            "payment_voided", "The payment was voided", 409, reason,
            retryable=False, payment_id=pid,
        )  # fmt: skip
    return problem(
        code or "payment_failed", "The payment failed", 502, reason,
        retryable=False, payment_id=pid,
    )  # fmt: skip


def payment_status(payment: dict[str, Any]) -> Outcome:
    """The outcome of an action that answers with this payment (result filled in by caller)."""
    status = SEND_STATUS[PaymentState(payment["state"])]
    if (
        payment.get("direction") == "outgoing"
        and payment.get("scheme") in SCHEME_ALIASES
        and (payment.get("escrow") or {}).get("collected")
    ):
        # An outgoing on-chain escrow payment the escrow has collected has paid, as the seller
        # asked: its money is held by the escrow contract (``authorized``) or went to the seller
        # (``captured``). What the seller does next (capture, void, refund) or the payer's
        # reclaim does not undo the payment: the send stays succeeded. An ``authorized`` one the
        # escrow has not collected is only signed: pending, like any other.
        status = SUCCEEDED
    if status == FAILED:
        return Outcome(FAILED, None, _payment_problem(payment))
    return Outcome(status, None)


def _http_outcome(result: dict[str, Any]) -> Outcome:
    """``send`` to a URL that answered without asking for payment: fetched, or an HTTP error."""
    response = result.get("response") or {}
    code = int(response.get("status") or 0)
    if 0 < code < 400:
        return Outcome(SUCCEEDED, result)
    error = problem(
        "http_error",
        "The URL answered with an error and did not ask for payment",
        502,
        f"the URL answered HTTP {code}; nothing was paid",
        retryable=code >= 500 or code in (408, 425, 429),
        response_status=code,
    )
    return Outcome(FAILED, result, error)


def _reclaim_outcome(payment: dict[str, Any]) -> Outcome:
    """``reclaim`` succeeded when the escrow holds nothing more for the payment and the payer
    took some of it back (``escrow.reclaimed`` > 0): ``reclaimed``, or ``captured`` /
    ``partially_refunded`` when the seller had captured part before. Anything else is pending:
    the reclaim's transaction has not been seen yet."""
    escrow = payment.get("escrow") or {}
    if escrow and int(escrow.get("held", 0)) == 0 and int(escrow.get("reclaimed", 0)) > 0:
        return Outcome(SUCCEEDED, None)
    return Outcome(PENDING, None)


def outcome_of(action: str, result: dict[str, Any]) -> Outcome:
    """The job outcome of an action's output (as dumped to JSON)."""
    if action == "send":
        payment = result.get("payment")
        if payment is None:
            return _http_outcome(result)
        found = payment_status(payment)
    elif action == "void":
        payment = result["payment"]
        escrow = payment.get("escrow") if payment.get("scheme") in SCHEME_ALIASES else None
        if payment["state"] == P.VOIDED:
            found = Outcome(SUCCEEDED, None)
        elif escrow is not None and payment.get("direction") == "incoming":
            # On-chain escrow: voiding the rest after a partial capture leaves the payment
            # captured; the void did its work when the escrow holds nothing any more.
            voided = escrow.get("held") == "0" and escrow.get("voided") not in (None, "0")
            found = Outcome(SUCCEEDED if voided else PENDING, None)
        else:
            found = payment_status(payment)
    elif action == "release":
        payment = result["payment"]
        found = payment_status(payment)
        if payment["state"] == P.SETTLED and payment.get("custodial"):
            # custodial escrow: captured into the escrow wallet, not yet forwarded
            found = Outcome(PENDING, None)
    elif action == "reclaim":
        found = _reclaim_outcome(result["payment"])
    elif action == "refund":
        refund = result["refund"]
        if refund["state"] == "succeeded":
            found = Outcome(SUCCEEDED, None)
        elif refund["state"] == "failed":
            found = Outcome(
                FAILED,
                None,
                problem(
                    "refund_failed",
                    "The refund did not settle",
                    502,
                    refund.get("failure_reason") or "the facilitator refused the refund",
                    retryable=False,
                    payment_id=refund["payment_id"],
                    refund_id=refund["id"],
                ),
            )
        else:
            found = Outcome(PENDING, None)
    else:  # receive, verify, balance: answered means done (verify's answer is `valid`)
        found = Outcome(SUCCEEDED, None)
    return Outcome(found.status, result, found.error)


# ------------------------------------------------------------------ results built from rows


def send_result(payment: Payment) -> dict[str, Any]:
    response = payment.response if payment.resource_url and payment.response else None
    output = s.SendOutput.model_validate(
        {"payment": payment_snapshot(payment), "response": response}
    )
    return output.model_dump(mode="json", by_alias=True)


def payment_result(payment: Payment) -> dict[str, Any]:
    output = s.PaymentOutput(payment=s.PaymentView.model_validate(payment_snapshot(payment)))
    return output.model_dump(mode="json", by_alias=True)


def refund_result(refund: Refund, payment: Payment) -> dict[str, Any]:
    output = s.RefundOutput(
        refund=s.RefundView(
            id=refund.id,
            payment_id=refund.payment_id,
            amount=str(refund.amount),
            state=refund.state,
            tx_hash=refund.tx_hash,
            failure_reason=refund.failure_reason,
        ),
        payment=s.PaymentView.model_validate(payment_snapshot(payment)),
    )
    return output.model_dump(mode="json", by_alias=True)


def write(
    session: Session,
    job_id: str,
    outcome: Outcome,
    payment_id: str | None = None,
    *,
    claim: int | None = None,
) -> bool:
    """Record an outcome on the job row (status, result and error together; a stale error from an
    earlier retry is cleared); whether it was recorded.

    ``claim``: the attempt number of the run writing its own outcome. It is refused once a later
    claim took the job over (see :func:`connector.jobs.update_job`). Jobs that follow their
    payment are written without it: whoever moves the payment reports it.
    """
    from datetime import UTC, datetime

    values: dict[str, Any] = {
        "status": outcome.status,
        "result": outcome.result,
        "error": outcome.error,
        "updated_at": datetime.now(UTC),
    }
    if payment_id is not None:
        values["payment_id"] = payment_id
    return update_job(session, job_id, values, claim)


# ------------------------------------------------------------------ jobs that follow a payment


def may_have_job(payment: Payment, source: str) -> bool:
    """Whether a payment that just left ``source`` can have a job to bring up to date: one
    waiting on it, or a finished ``send``/``release`` that reported it.

    Cheap and conservative, so that hot paths skip the lookup: a payment paid through a paywall
    with automatic capture, or settled by the job that is running it (``follow_jobs=False``),
    never looks jobs up. A payment leaving ``settled`` (a reorganization took its settlement)
    or ``failed`` (the chain shows it paid after all) may have a finished job that said so.
    """
    own = (
        payment.direction == "outgoing"
        or payment.hold_expires_at is not None
        or bool(payment.custodial)
    )
    if source in (P.SETTLED, P.FAILED):
        return own
    if payment.state == P.SETTLING:
        return False
    if source in (P.REQUIRES_APPROVAL, P.REFUNDING):
        return True
    if source in (P.AUTHORIZED, P.SETTLING):
        return own
    return False


def follow_payment(session: Session, payment: Payment) -> None:
    """Bring every job waiting on ``payment``, and every finished ``send``/``release`` that
    reported it, up to date, in the caller's transaction (the one that moves the payment)."""
    rows = session.execute(
        select(_JOBS.c.id, _JOBS.c.action, _JOBS.c.status, _JOBS.c.result, _JOBS.c.error).where(
            _JOBS.c.payment_id == payment.id, _JOBS.c.status.in_(sorted(WAITING | TERMINAL))
        )
    ).all()
    for job_id, action, status, previous, error in rows:
        if status in TERMINAL:
            if action in FOLLOWS_AFTER_FINISH:
                _follow_finished(session, job_id, action, status, error, payment)
            continue
        if action == "send":
            result = send_result(payment)
        elif action == "refund":
            refund_id = ((previous or {}).get("refund") or {}).get("id")
            refund = session.get(Refund, refund_id) if refund_id else None
            if refund is None:
                continue
            result = refund_result(refund, payment)
        else:
            result = payment_result(payment)
        found = outcome_of(action, result)
        if action == "release" and found.status == PENDING and payment.state == P.SETTLED:
            # captured into custodial escrow: the forward is the job's own work; run it again
            # (the stale-job sweep picks queued jobs up)
            found = Outcome(QUEUED, result)
        write(session, job_id, found)


def _follow_finished(
    session: Session,
    job_id: str,
    action: str,
    status: str,
    error: dict[str, Any] | None,
    payment: Payment,
) -> None:
    """A finished ``send``/``release`` whose payment moved again. Its result always shows the
    payment as it is now; its status changes only when the chain contradicts it:

    * ``succeeded`` and the payment can no longer move money (a reorganization removed its
      settlement and the authorization can never be settled again) → ``failed``,
      ``settlement_reverted``;
    * ``succeeded`` and the payment back in flight (being settled again after a reorganization)
      → still ``succeeded``: a final status does not go back to waiting, and the same
      authorization settles again (exactly once) or ends the job ``failed`` as above;
    * ``failed`` ``send`` and the payment's money moved after all → ``succeeded``.
    """
    result = send_result(payment) if action == "send" else payment_result(payment)
    found = outcome_of(action, result)
    if status == SUCCEEDED and found.status == FAILED:
        found = Outcome(FAILED, result, _reverted(payment))
    elif status == FAILED and found.status == SUCCEEDED and action == "send":
        pass
    else:
        found = Outcome(status, result, error)  # what it said stands; the payment is current
    write(session, job_id, found)


def _reverted(payment: Payment) -> dict[str, Any]:
    reason = payment.failure_reason or f"the payment ended {payment.state}"
    return problem(
        "settlement_reverted",
        "The settlement was undone by a chain reorganization",
        502,
        "the payment had settled, then a chain reorganization removed its transaction and it "
        f"could not be settled again ({reason}); no money moved",
        retryable=False,
        payment_id=payment.id,
        failure_code=payment.failure_code,
    )
