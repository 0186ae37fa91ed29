"""Run an action job: the one entry point the Celery task calls.

The job row is the durable record of the call. A job re-run after a crash finds its own earlier
work through the job id (used as the payment's and refund's idempotency key), so it resumes
instead of starting over — a retried ``send`` never signs a second authorization.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlmodel import Session, col

import connector.payments.protocol as proto
from connector.actions import outcome
from connector.actions import schemas as s
from connector.actions.registry import BY_KEY
from connector.errors import ConcurrentUpdate, ConnectorError, ExternalServiceError, NotFound
from connector.jobs import (
    ClaimedJob,
    Handover,
    JobTakenOver,
    claim_job,
    get_job,
    job_lease,
    set_job_status,
)
from connector.logs import get_logger
from connector.metrics import ACTION_SECONDS
from connector.payments import escrow, escrow_ledger, escrow_sync, receive, refunds, send
from connector.payments.context import ConnectionContext
from connector.payments.context_loader import load_connection
from connector.payments.states import PaymentState
from connector.payments.views import payment_snapshot
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork, is_connection_error, one_connection
from connector.storage.models.payments import Job, Payment
from connector.x402 import exact_evm
from connector.x402.codec import decode_b64_json, parse_payment_payload
from connector.x402.requirement import requirement_from_wire

log = get_logger(__name__)
Handler = Callable[[Runtime, ConnectionContext, Any, ClaimedJob], Any]


def problem(exc: ConnectorError) -> dict[str, Any]:
    return outcome.problem_from_error(exc)


def _payment_view(payment: Payment) -> s.PaymentView:
    return s.PaymentView.model_validate(payment_snapshot(payment))


@dataclass(frozen=True)
class Done:
    """A handler's answer when it already wrote the job's outcome in its own last transaction."""

    outcome: outcome.Outcome


def _send_output(payment: Payment) -> s.SendOutput:
    return s.SendOutput.model_validate(outcome.send_result(payment))


def _dump(output: BaseModel) -> dict[str, Any]:
    return output.model_dump(mode="json", by_alias=True)


def _send(
    rt: Runtime,
    ctx: ConnectionContext,
    inp: s.SendInput,
    job: ClaimedJob,
    claim: UnitOfWork | None = None,
) -> s.SendOutput | Done:
    """``claim``: the job's uncommitted claim; a first direct send commits it with the payment."""
    fresh = job.payment_id is None
    prepared = send.prepare_send(
        rt,
        ctx,
        inp,
        idempotency_key=job.id,
        job_id=job.id,
        job_claim=job.attempts,
        known_new=fresh,
        uow=claim,
    )
    if prepared.payment is None:
        assert prepared.probe is not None
        return s.SendOutput.model_validate(
            {"payment": None, "response": proto.http_result(prepared.probe)}
        )
    payment = prepared.payment
    written: list[outcome.Outcome] = []
    refused: list[outcome.Outcome] = []

    def record(session: Session, final: Payment) -> None:
        # The job's outcome commits with the payment's final state: one transaction, and no
        # window in which a settled payment's job still looks unfinished.
        found = outcome.outcome_of("send", outcome.send_result(final))
        if outcome.write(session, job.id, found, claim=job.attempts):
            written.append(found)
            return
        # A later claim took the job over (this run outlived its lease). Never raise here: the
        # payment's final state is what happened and commits all the same. The job row is the
        # newer run's; jobs that follow the payment are brought up to date as they would be
        # had no job of its own settled it (one the newer run holds is not touched: it finds
        # the payment final and reports it).
        refused.append(found)
        outcome.follow_payment(session, final)

    if prepared.counted:
        payment, _ = send.attempt_send(rt, ctx, payment, inp, on_final=record)
    elif payment.state in (PaymentState.AUTHORIZED, PaymentState.SETTLING):
        payment, _ = send.execute_send(rt, ctx, payment.id)
    if refused:  # the payment's transaction has committed: now the run may stop
        raise JobTakenOver(job.id, job.attempts)
    if written:
        return Done(written[0])
    return _send_output(payment)


def _truth_after_race(rt: Runtime, job: ClaimedJob) -> s.SendOutput:
    """Another worker (the reconciler's ``drive_payment``, a redelivered task) moved this job's
    payment while this one worked on it: re-read it and report what it really is. Still in
    flight: the job is retried (the other worker is finishing it)."""
    with UnitOfWork(rt.engine) as uow:
        row = uow.session.get(Job, job.id)
        payment = uow.session.get(Payment, row.payment_id) if row and row.payment_id else None
    in_flight = payment is None or (
        payment.state in (PaymentState.AUTHORIZED, PaymentState.SETTLING)
        and not escrow_ledger.collected(payment)  # held by the escrow contract: paid
    )
    if in_flight:
        raise ExternalServiceError(
            f"the payment of job {job.id} is being settled by another worker; retrying",
            payment_id=payment.id if payment else None,
        )
    assert payment is not None
    return _send_output(payment)


def _receive(
    rt: Runtime, ctx: ConnectionContext, inp: s.ReceiveInput, job: ClaimedJob
) -> s.ReceiveOutput:
    request = receive.create_request(rt, ctx, inp)
    return s.ReceiveOutput(payment_request=receive.request_view(rt, request))


def _verify(
    rt: Runtime, ctx: ConnectionContext, inp: s.VerifyInput, job: ClaimedJob
) -> s.VerifyOutput:
    chain = rt.chain(ctx.rpc_url)
    if inp.tx_hash is not None:
        receipt = chain.get_receipt(inp.tx_hash)
        if receipt is None:
            return s.VerifyOutput(valid=False, reason="transaction_not_found")
        transfers = chain.token_transfers(receipt, inp.asset)
        confirmations = chain.block_number() - receipt.block_number + 1
        views = [
            s.TransferView.model_validate(
                {"from": t.from_, "to": t.to, "value": str(t.value), "log_index": t.log_index}
            )
            for t in transfers
        ]
        reason = None
        if receipt.status != 1:
            reason = "transaction_reverted"
        elif not any(
            (inp.expected_to is None or t.to.lower() == inp.expected_to.lower())
            and (inp.expected_amount is None or t.value == int(inp.expected_amount))
            for t in transfers
        ):
            reason = "no_matching_transfer"
        elif confirmations < inp.min_confirmations:
            reason = "not_enough_confirmations"
        return s.VerifyOutput(
            valid=reason is None, reason=reason, transfers=views, confirmations=confirmations
        )
    raw = inp.payment_payload
    wire = decode_b64_json(raw, "payment_payload") if isinstance(raw, str) else raw
    incoming = parse_payment_payload(wire, "payment_payload")
    requirement = requirement_from_wire(inp.requirements, incoming.version, "requirements")
    result = exact_evm.verify_exact(
        incoming.payload,
        requirement,
        chain,
        scheme=incoming.scheme,
        network=incoming.network,
    )
    return s.VerifyOutput(valid=result.is_valid, reason=result.reason, payer=result.payer)


def _refund(
    rt: Runtime, ctx: ConnectionContext, inp: s.RefundInput, job: ClaimedJob
) -> s.RefundOutput:
    amount = int(inp.amount) if inp.amount is not None else None
    refund = refunds.start_refund(rt, ctx, inp.payment_id, amount, inp.reason, job.id)
    refund, payment = refunds.settle_refund(rt, ctx, refund.id)
    return s.RefundOutput(
        refund=s.RefundView(
            id=refund.id,
            payment_id=refund.payment_id,
            amount=str(refund.amount),
            state=refund.state,
            tx_hash=refund.tx_hash,
            failure_reason=refund.failure_reason,
        ),
        payment=_payment_view(payment),
    )


def _release(
    rt: Runtime, ctx: ConnectionContext, inp: s.ReleaseInput, job: ClaimedJob
) -> s.PaymentOutput:
    # The job id keys an on-chain escrow capture: a retried job resumes it, never repeats it.
    payment = escrow.release(
        rt,
        ctx,
        inp.payment_id,
        amount=int(inp.amount) if inp.amount is not None else None,
        fee_bps=inp.fee_bps,
        key=job.id,
    )
    return s.PaymentOutput(payment=_payment_view(payment))


def _void(
    rt: Runtime, ctx: ConnectionContext, inp: s.PaymentRef, job: ClaimedJob
) -> s.PaymentOutput:
    return s.PaymentOutput(payment=_payment_view(escrow.void(rt, ctx, inp.payment_id, key=job.id)))


def _reclaim(
    rt: Runtime, ctx: ConnectionContext, inp: s.PaymentRef, job: ClaimedJob
) -> s.PaymentOutput:
    return s.PaymentOutput(
        payment=_payment_view(escrow_sync.reclaim_payment(rt, ctx, inp.payment_id))
    )


def _balance(
    rt: Runtime, ctx: ConnectionContext, inp: s.BalanceInput, job: ClaimedJob
) -> s.BalanceOutput:
    asset, _, _ = proto.asset_for(rt, ctx, ctx.network, inp.asset)
    address = ctx.wallet_address or ctx.receiving_address  # receive-only: the pay_to address
    balance = rt.chain(ctx.rpc_url).token_balance(asset, address)
    with UnitOfWork(rt.engine) as uow:
        rows = uow.session.execute(
            select(Payment)
            .where(col(Payment.connection_id) == ctx.id)
            .order_by(col(Payment.id).desc())
            .limit(inp.history_limit)
        ).scalars()
        history = [_payment_view(p) for p in rows]
    return s.BalanceOutput(
        address=address,
        network=ctx.network,
        asset=asset,
        balance=str(balance),
        history=history,
    )


HANDLERS: dict[str, Handler] = {
    "send": _send,
    "receive": _receive,
    "verify": _verify,
    "refund": _refund,
    "release": _release,
    "void": _void,
    "reclaim": _reclaim,
    "balance": _balance,
}


def run_job(rt: Runtime, job_id: str) -> dict[str, Any] | None:
    """Run a job; its result, or None when it failed (the error is on the job row) or another
    worker is running it (the job row will carry its outcome)."""
    found = run(rt, job_id)
    return None if found.status in (outcome.FAILED, outcome.RUNNING) else found.result


def run(rt: Runtime, job_id: str, handover: Handover | None = None) -> outcome.Outcome:
    """Run a job and return its outcome (status, result, error) as recorded on the job row.

    ``running``: another worker holds the job's lease (this is a second delivery of its task);
    nothing was run or changed, and that worker records the outcome. A run whose job a later
    claim took over while it worked returns what the row holds, its own writes refused (see
    :func:`_taken_over`). ``handover``: the claim of
    the task run this one retries (see :class:`Handover`); it is updated with this run's claim
    once committed, for the next retry.
    """
    with one_connection(rt.engine):
        return _claim_and_run(rt, job_id, handover or Handover())


def _claim_and_run(rt: Runtime, job_id: str, handover: Handover) -> outcome.Outcome:
    # The claim is handed to the action uncommitted: a direct send commits it together with its
    # payment (one transaction fewer per payment); every other path commits it before doing
    # anything else, so no other transaction ever waits on the job row this one has locked.
    with UnitOfWork(rt.engine) as claim:
        job = claim_job(
            claim.session, job_id, lease=job_lease(rt.settings), handover=handover.attempts
        )
        if isinstance(job, Job):
            if job.status in outcome.TERMINAL:  # a redelivered task returns the stored result
                return outcome.Outcome(job.status, job.result, job.error)
            # Running under another worker's live lease: leave it alone. Should that worker
            # die, the lease expires and the stale-job sweep sends the job again.
            log.info("job is running in another worker", extra={"job_id": job_id})
            return outcome.Outcome(outcome.RUNNING, None, None)
        spec = BY_KEY.get(job.action)
        if spec is None:
            claim.commit()
            raise NotFound(f"unknown action {job.action}")
        try:  # read in the claim's transaction: one round trip fewer per job
            ctx: ConnectionContext | None = load_connection(rt, job.connection_id, claim.session)
        except ConnectorError:
            ctx = None  # _run reads it again and reports the error on the job
        started = time.perf_counter()
        status = "retrying"
        try:
            found = _run(rt, job, spec, ctx, claim)
            status = found.status
            return found
        finally:
            if claim.committed:  # the row says running under this claim: the retry's token
                handover.attempts = job.attempts
            ACTION_SECONDS.labels(action=job.action, status=status).observe(
                time.perf_counter() - started
            )


def _run(
    rt: Runtime, job: ClaimedJob, spec: Any, ctx: ConnectionContext | None, claim: UnitOfWork
) -> outcome.Outcome:
    claimed = job

    def undone() -> ClaimedJob:
        # End the claim's transaction if it is still open (a no-op once committed); the job as
        # its row stands after that, for the fence on this run's writes.
        claim.rollback()
        return _as_claimed(claimed, claim)

    try:
        inp = spec.input_model.model_validate(job.input or {})
        if job.action == "send" and ctx is not None:
            try:
                output: Any = _send(rt, ctx, inp, job, claim)
            except ConcurrentUpdate:
                job = undone()
                output = _truth_after_race(rt, job)
        else:
            claim.commit()
            ctx = ctx or load_connection(rt, job.connection_id)
            output = HANDLERS[job.action](rt, ctx, inp, job)
    except JobTakenOver:
        job = undone()  # see JobTakenOver
        return _taken_over(rt, job)
    except ExternalServiceError as exc:
        job = undone()  # the job row must be free for the next write
        if exc.retryable:
            if not _requeue(rt, job, problem(exc)):
                return _taken_over(rt, job)  # the newer run retries, not this task
            raise
        return _fail(rt, job, problem(exc))
    except ConcurrentUpdate as exc:
        # Lost a race with another worker on the same payment: nothing of this run committed.
        # Run again from the stored state (a retry), never report it as the action's outcome.
        job = undone()
        if not _requeue(rt, job, problem(exc)):
            return _taken_over(rt, job)
        raise
    except ConnectorError as exc:
        job = undone()
        return _fail(rt, job, problem(exc))
    except ValidationError as exc:
        job = undone()
        return _fail(
            rt,
            job,
            outcome.problem(
                "validation_failed",
                "Validation failed",
                422,
                str(exc.errors()[0].get("msg")),
                retryable=False,
            ),
        )
    except Exception as exc:
        # Not the action's outcome: a bug, or a database that refuses a statement (a schema the
        # code does not match). The claim is undone (or was committed before a network call):
        # put the job back in the queue with the reason, instead of leaving it `running` with
        # no trace until the stale-job sweep. A lost connection is not written (the database is
        # gone): the task retries it at once.
        job = undone()
        if not is_connection_error(exc):
            _requeue_after(rt, job, exc)
        raise
    if isinstance(output, Done):
        return output.outcome
    return _record(rt, _as_claimed(claimed, claim), output)


def _as_claimed(claimed: ClaimedJob, claim: UnitOfWork) -> ClaimedJob:
    """The run's job as its row stands once ``claim`` ended, for the fence on this run's writes.

    A direct send hands its claim to the payment's transaction uncommitted; when that transaction
    is rolled back (a refusal before signing, a lost race on the payment's key) the claim never
    happened: the row keeps the attempt number from before it, and this run's writes are fenced
    on that number, not on the one the rolled-back claim would have set.
    """
    return claimed if claim.committed else replace(claimed, attempts=claimed.attempts - 1)


def _record(rt: Runtime, job: ClaimedJob, output: BaseModel) -> outcome.Outcome:
    """Write the action's answer as the job's outcome (succeeded, failed, or waiting)."""
    found = outcome.outcome_of(job.action, _dump(output))
    # release, void and refund act on a payment: link it, so the job can follow that payment
    linked = getattr(output, "payment", None)
    payment_id = linked.id if job.action != "send" and isinstance(linked, s.PaymentView) else None
    with UnitOfWork(rt.engine) as uow:
        written = outcome.write(
            uow.session, job.id, found, payment_id=payment_id, claim=job.attempts
        )
        uow.commit()
    return found if written else _taken_over(rt, job)


def _requeue(rt: Runtime, job: ClaimedJob, error: dict[str, Any]) -> bool:
    """Put the job back in ``queued`` with the reason, for the task's retry; False when a later
    claim took the job over (nothing written: the job is not this run's to requeue)."""
    with UnitOfWork(rt.engine) as uow:
        written = set_job_status(uow.session, job.id, "queued", error=error, claim=job.attempts)
        uow.commit()
    return written


def _taken_over(rt: Runtime, job: ClaimedJob) -> outcome.Outcome:
    """This run's write to its job was refused: a later claim took the job over while this run
    still worked (it outlived its lease, which the ``threads`` and ``solo`` pools do not stop).

    The job is the newer run's, which records its outcome; this run reports the outcome the row
    holds now (often ``running``) instead of its own, and its task is not retried. Nothing it
    did is lost: an action resumes through the job id (the same payment, refund or capture).
    """
    with UnitOfWork(rt.engine) as uow:
        row = get_job(uow.session, job.id)
    log.warning(
        "job taken over by a later claim: this run's write was refused",
        extra={"job_id": job.id, "claim_attempts": job.attempts, "row_attempts": row.attempts},
    )
    return outcome.Outcome(row.status, row.result, row.error)


def _requeue_after(rt: Runtime, job: ClaimedJob, exc: Exception) -> None:
    """Record an unexpected failure on the job, back in ``queued`` (the sweep sends it again).

    Only the exception's type is recorded and logged here: a database error's text carries the
    statement's parameters, which may include a signed authorization. A job another claim took
    over is not touched (the exception is raised all the same: a bug stays the task's failure).
    """
    job_id = job.id
    name = type(exc).__name__
    log.error("job failed unexpectedly", extra={"job_id": job_id, "error": name})
    error = outcome.problem(
        "internal_error",
        "Internal error",
        500,
        f"{name} while running the job; it stays queued and runs again",
        retryable=True,
    )
    try:
        if not _requeue(rt, job, error):
            _taken_over(rt, job)
    except Exception:  # the original failure is the one to report
        log.warning("could not record the failure on the job", extra={"job_id": job_id})


def _fail(rt: Runtime, job: ClaimedJob, error: dict[str, Any]) -> outcome.Outcome:
    found = outcome.Outcome(outcome.FAILED, None, error)
    with UnitOfWork(rt.engine) as uow:
        written = outcome.write(uow.session, job.id, found, claim=job.attempts)
        uow.commit()
    if not written:
        return _taken_over(rt, job)
    log.info("job failed", extra={"job_id": job.id, "problem": error.get("type")})
    return found
