"""The ``send`` action: pay an x402-protected URL, or pay an address directly.

Two phases, each safe to repeat:

1. :func:`prepare_send` decides and signs. It probes the URL (no money moves on a probe), picks
   an offer the policy accepts, creates the payment, reserves the budget and signs ONE
   authorization, storing it before anything uses it. Refusals end in ``rejected`` naming the
   rule; dry-runs end in ``simulated``; large amounts wait in ``requires_approval``.
2. :func:`execute_send` uses the stored authorization: it moves the payment to ``settling`` first
   (so a crash is visible), then retries the paid request (or the facilitator settle) with the
   very same authorization as often as needed. Because an EIP-3009 nonce can be used once, no
   retry can pay twice.

An on-chain escrow (``authCapture``) payment follows the escrow instead of ending ``settled``:
once its collection is funded, the escrow events of the settlement transaction are applied
(:mod:`connector.payments.escrow_sync`), so it ends ``authorized`` (held by the contract) or
``captured`` (charged), and its budget reservation follows the escrow from then on. What the
seller (or the payer's ``reclaim``) does later is picked up by reconciliation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

import connector.payments.protocol as proto
from connector.actions.schemas import SendInput
from connector.errors import (
    ConcurrentUpdate,
    ExternalServiceError,
    PolicyRefused,
    SettlementPending,
    WalletKeyMissing,
)
from connector.ids import new_id
from connector.jobs import JobTakenOver, link_payment
from connector.logs import get_logger
from connector.payments import escrow_sync
from connector.payments.context import ConnectionContext
from connector.payments.escrow_ledger import collected, counts
from connector.payments.http_fetch import Fetched, FetchFailed, same_origin, without_credentials
from connector.payments.machine import Step, advance, insert_payment, transition, update_fields
from connector.payments.onchain import SETTLEMENT_PENDING, authorization_used, outcome
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.policy.rules import Candidate, check_static_rules, needs_approval
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Job, Payment

log = get_logger(__name__)
S = PaymentState
# Called inside the transaction that gives a payment its final state, so that whatever the caller
# records about the outcome (an action job's result) commits together with it.
OnFinal = Callable[[Session, Payment], None]


@dataclass
class SendPrepared:
    payment: Payment | None
    probe: Fetched | None  # set when the URL answered without asking for payment
    # True when this call signed and moved the payment to ``settling`` with its first attempt
    # counted: the caller goes straight to :func:`attempt_send`.
    counted: bool = False


def find_by_key(session: Session, connection_id: str, key: str | None) -> Payment | None:
    if key is None:
        return None
    found = session.execute(
        select(Payment).where(
            col(Payment.connection_id) == connection_id,
            col(Payment.direction) == "outgoing",
            col(Payment.idempotency_key) == key,
        )
    ).scalar_one_or_none()
    return found if isinstance(found, Payment) else None


def _request_body(inp: SendInput) -> bytes | None:
    return inp.body.encode() if inp.body is not None else None


def prepare_send(
    rt: Runtime,
    ctx: ConnectionContext,
    inp: SendInput,
    *,
    idempotency_key: str | None,
    job_id: str | None = None,
    job_claim: int | None = None,
    now: datetime | None = None,
    known_new: bool = False,
    uow: UnitOfWork | None = None,
) -> SendPrepared:
    """Decide, sign and hand to settlement in one transaction (or find the earlier payment).

    ``known_new`` says the caller already knows no payment carries this key (a job that has no
    payment linked yet), which saves the lookup; the unique key still guards against a race.
    ``uow``: an open unit of work (a job's claim) to commit a new direct payment in; it is
    committed first instead when the payment may already exist or a network call comes first.
    ``job_claim``: the attempt number of the job run's claim. The payment is linked to the job
    only while that claim holds it; a run whose job another claim took over creates no payment
    (:class:`~connector.jobs.JobTakenOver`, nothing committed: the signature is never used).
    """
    if ctx.wallet_address is None:
        raise WalletKeyMissing(
            f"connection {ctx.id} is receive-only (no wallet key): sending needs one",
            connection_id=ctx.id,
        )
    direct: proto.Chosen | None = None
    if uow is not None and known_new and inp.url is None:
        direct = proto.direct_requirement_offline(rt, ctx, inp)
    if uow is not None and direct is None:
        # An earlier payment may be resumed (other transactions follow), or a network call comes
        # first (URL probe, token domain not read yet): end the caller's transaction now.
        uow.commit()
    if not known_new:
        with UnitOfWork(rt.engine) as lookup:
            existing = find_by_key(lookup.session, ctx.id, idempotency_key)
            if existing is not None:
                return SendPrepared(existing, None)

    resource: dict[str, Any] | None = None
    paying_url = inp.url  # the URL that asked for payment: the only one that gets the header
    via: tuple[str, ...] = ()
    if inp.url is not None:
        try:
            probe = proto.fetcher_for(rt).fetch(
                inp.method, inp.url, headers=inp.headers, body=_request_body(inp)
            )
        except FetchFailed as exc:
            # Nothing was signed yet: report at once instead of retrying a broken server.
            raise FetchFailed(exc.detail, retryable=False, url=inp.url) from exc
        if probe.status != 402:
            return SendPrepared(None, probe)
        # After redirects, the 402 came from another URL than the one asked for: that URL is the
        # one the policy judges and the one the signed header is sent to, never the first hop.
        paying_url, via = probe.url, tuple(probe.redirects)
        offer = proto.parse_payment_required(probe)
        chosen, refusal = proto.choose_requirement(offer, ctx, inp)
        version = offer.version
        resource = offer.resource
    else:
        chosen = direct or proto.direct_requirement(rt, ctx, inp)
        refusal = None
        version = 2
    requirement = chosen.requirement

    now = now or datetime.now(UTC)
    payment = Payment(
        id=new_id("pay"),
        connection_id=ctx.id,
        direction="outgoing",
        state=S.CREATED.value,
        amount=requirement.amount,
        asset=requirement.asset,
        network=requirement.network,
        payer=ctx.wallet_address,
        payee=requirement.pay_to,
        scheme=requirement.scheme,
        x402_version=version,
        resource_url=paying_url,
        description=inp.description,
        requirement=chosen.raw,
        idempotency_key=idempotency_key,
        dry_run=inp.dry_run or ctx.policy.dry_run,
        metadata_=dict(inp.metadata) or None,
    )
    # An escrow payment's history is read from a lower bound recorded now (the head, less a
    # margin): no event of it can be older, and providers refuse log queries from genesis.
    # Read before the transaction opens (always a URL payment: nothing of the caller's is open).
    bound = (
        escrow_sync.bound_fields(rt.chain(ctx.rpc_url)) if escrow_sync.is_escrow(payment) else {}
    )
    with _same_or_new(rt, uow) as uow:
        steps = decide(
            uow.session, rt, ctx, payment, requirement, resource, refusal, inp.max_amount, now,
            via=via,
        )  # fmt: skip
        counted = bool(steps) and steps[-1].target is S.AUTHORIZED
        if counted and escrow_sync.is_escrow(payment):
            # An escrow collection goes to the seller at once (``created -> settling``): for
            # it ``authorized`` means "held by the escrow contract", which only the chain says.
            signed = steps.pop()
            steps.append(Step(S.SETTLING, {**signed.changes, **bound, "settle_attempts": 1}))
        elif counted:
            # Signed: hand it to settlement in the same commit. The authorization is stored
            # before anything uses it, and a crash from here on leaves a visible ``settling``
            # payment that the task retry or the reconciler finishes with the same signature.
            steps.append(Step(S.SETTLING, {"settle_attempts": 1}))
        try:
            insert_payment(uow.session, payment, now=now, then=steps)
            if job_id is not None:  # link the action job in the same transaction
                linked = link_payment(uow.session, job_id, payment.id, claim=job_claim)
                if not linked and job_claim is not None:  # another run holds the job now
                    uow.rollback()
                    raise JobTakenOver(job_id, job_claim)
            uow.commit()
        except IntegrityError:
            uow.rollback()
            again = find_by_key(uow.session, ctx.id, idempotency_key)
            uow.rollback()  # end the read: the caller's next transactions may be elsewhere
            if again is None:
                raise
            return SendPrepared(again, None)
    return SendPrepared(payment, None, counted=counted)


@contextmanager
def _same_or_new(rt: Runtime, uow: UnitOfWork | None) -> Iterator[UnitOfWork]:
    """The caller's open unit of work (the caller closes it), or a new one closed here."""
    if uow is not None:
        yield uow
        return
    with UnitOfWork(rt.engine) as fresh:
        yield fresh


def decide(
    session: Session,
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    requirement: proto.Requirement,
    resource: dict[str, Any] | None,
    refusal: PolicyRefused | None,
    max_amount: str | None,
    now: datetime,
    *,
    approved: bool = False,
    via: tuple[str, ...] = (),
) -> list[Step]:
    """Run the policy on a ``created`` (or approved) payment and sign if everything agrees.

    Returns the steps to take (the caller writes them); the budget reservation, when one is
    needed, is already made in ``session``.
    """
    policy = ctx.policy
    try:
        if refusal is not None:
            raise refusal
        if max_amount is not None and payment.amount > int(max_amount):
            raise PolicyRefused(
                f"price {payment.amount} exceeds this call's max_amount {max_amount}",
                rule="max_amount",
            )
        check_static_rules(
            policy,
            Candidate(
                amount=payment.amount,
                asset=payment.asset,
                network=payment.network,
                payee=payment.payee,
                url=payment.resource_url,
                via=via,
            ),
        )
        if payment.dry_run:
            usage = budgets.usage(session, ctx.id, policy, now)
            for use in usage:
                if use.spent + payment.amount > use.limit:
                    raise PolicyRefused(
                        f"{use.window} budget {use.limit} would be exceeded",
                        rule=f"budget.{use.window}",
                    )
            would_pay = {"would_pay": proto.requirement_to_wire(requirement, 2)}
            return [Step(S.SIMULATED, {"response": would_pay})]
        if not approved and needs_approval(policy, payment.amount):
            return [Step(S.REQUIRES_APPROVAL, {"approvals_required": policy.approvals_required})]
        budgets.reserve(
            session,
            connection_id=ctx.id,
            payment_id=payment.id,
            amount=payment.amount,
            policy=policy,
            now=now,
            fresh=not approved,
        )
    except PolicyRefused as refused:
        return [Step(S.REJECTED, {"failure_code": refused.rule, "failure_reason": refused.detail})]
    signed = proto.sign_payment(
        ctx.account(),
        requirement,
        payment.x402_version or 2,
        resource,
        accepted_raw=payment.requirement,
    )
    return [
        Step(
            S.AUTHORIZED,
            {
                "signed_payload": signed.wire,
                "nonce": signed.nonce,
                "valid_before": signed.valid_before,
                "payer": signed.payer,
            },
        )
    ]


def _job_input(session: Session, payment_id: str) -> SendInput | None:
    job = (
        session.execute(
            select(Job).where(col(Job.payment_id) == payment_id).order_by(col(Job.created_at))
        )
        .scalars()
        .first()
    )
    if job is None or job.input is None:
        return None
    return SendInput.model_validate(job.input)


def execute_send(
    rt: Runtime, ctx: ConnectionContext, payment_id: str
) -> tuple[Payment, Fetched | None]:
    """Use the stored authorization; repeatable until the payment leaves ``settling``.
    An escrow payment in ``authorized`` whose funds the escrow holds is paid: nothing to do."""
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
        if payment is None:
            raise LookupError(payment_id)
        if collected(payment):
            return payment, None
        if payment.state == S.AUTHORIZED.value:
            transition(
                uow.session, payment, S.SETTLING, settle_attempts=payment.settle_attempts + 1
            )
        elif payment.state == S.SETTLING.value:
            update_fields(uow.session, payment, settle_attempts=payment.settle_attempts + 1)
        else:
            return payment, None
        inp = _job_input(uow.session, payment_id) if payment.resource_url else None
        uow.commit()
    return attempt_send(rt, ctx, payment, inp)


def attempt_send(
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    inp: SendInput | None,
    on_final: OnFinal | None = None,
) -> tuple[Payment, Fetched | None]:
    """One attempt with the stored authorization of a ``settling`` payment whose attempt has
    already been counted (by :func:`execute_send` or by :func:`prepare_send`)."""
    if payment.resource_url is not None:
        return _pay_url(rt, ctx, payment, inp, on_final)
    return _settle_direct(rt, ctx, payment, on_final), None


def _pay_url(
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    inp: SendInput | None,
    on_final: OnFinal | None = None,
) -> tuple[Payment, Fetched | None]:
    assert payment.signed_payload is not None and payment.resource_url is not None
    name, value = proto.payment_header(payment.x402_version or 2, payment.signed_payload)
    method = inp.method if inp else "GET"
    own = inp.headers if inp else {}
    if inp is not None and inp.url is not None and not same_origin(inp.url, payment.resource_url):
        own = without_credentials(own)  # reached by a redirect: not the origin they were for
    headers = {**own, name: value}
    body = _request_body(inp) if inp else None
    try:
        fetched = proto.fetcher_for(rt).fetch(
            method, payment.resource_url, headers=headers, body=body, follow_redirects=False
        )
    except FetchFailed:
        # Outcome unknown: the server may have settled. Stay in settling; the task retries
        # with the same authorization and the reconciler reads the chain.
        raise
    settlement = proto.parse_settlement(fetched)
    result = proto.http_result(fetched)
    if 200 <= fetched.status < 300:
        tx = settlement.get("transaction") if settlement else None
        if tx or _authorization_used(rt, ctx, payment):
            return _finish_paid(rt, ctx, payment, tx or None, result, on_final), fetched
        # Accepted but not settled yet (the payee holds it, e.g. manual capture): stay in
        # settling with the response recorded; the reconciler settles or fails it from the chain.
        with UnitOfWork(rt.engine) as uow:
            current = uow.session.get(Payment, payment.id)
            assert current is not None
            update_fields(uow.session, current, response=result)
            uow.commit()
            return current, fetched
    if _authorization_used(rt, ctx, payment):
        return _finish_paid(rt, ctx, payment, None, result, on_final), fetched
    reason = (settlement or {}).get("errorReason") or proto.error_from_body(fetched)
    submitted = str((settlement or {}).get("transaction") or "") or None
    if reason == SETTLEMENT_PENDING or submitted:
        # The server's facilitator submitted a transfer: unknown until the chain says.
        verdict = outcome(rt, ctx, payment, submitted, pending=True)
        if verdict.settled:
            return _finish_paid(rt, ctx, payment, verdict.tx_hash, result, on_final), fetched
        if verdict.unknown:
            raise _pending(rt, payment, verdict.tx_hash, str(reason))
    if fetched.status >= 500:
        raise ExternalServiceError(
            f"{payment.resource_url} answered HTTP {fetched.status} to the paid request",
            payment_id=payment.id,
        )
    return _finish_failed(
        rt,
        payment,
        "payment_refused",
        f"server answered HTTP {fetched.status}: {reason}",
        definite=False,
        response=result,
        on_final=on_final,
    ), fetched


def _settle_direct(
    rt: Runtime, ctx: ConnectionContext, payment: Payment, on_final: OnFinal | None = None
) -> Payment:
    assert payment.signed_payload is not None and payment.requirement is not None
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    answer = facilitator.settle(payment.signed_payload, payment.requirement)
    tx_hash = str(answer.get("transaction") or "") or None
    if answer.get("success"):
        return _finish_paid(rt, ctx, payment, tx_hash, None, on_final)
    reason = str(answer.get("errorReason") or "facilitator refused to settle")
    verdict = outcome(rt, ctx, payment, tx_hash, pending=reason == SETTLEMENT_PENDING)
    if verdict.settled:
        return _finish_paid(rt, ctx, payment, verdict.tx_hash, None, on_final)
    if verdict.unknown:
        raise _pending(rt, payment, verdict.tx_hash, reason)
    # Definite: nothing was ever submitted (the facilitator refused before sending), or the
    # transaction reverted. After a revert the authorization stays valid until its deadline,
    # so the budget keeps the reservation until then (the reconciler releases it).
    return _finish_failed(
        rt,
        payment,
        "settlement_failed",
        reason,
        definite=verdict.tx_hash is None,
        on_final=on_final,
    )


def _pending(
    rt: Runtime,
    payment: Payment,
    tx_hash: str | None,
    reason: str,
    response: dict[str, Any] | None = None,
) -> SettlementPending:
    """Record the submitted transaction (and the server's answer, when it delivered already) on
    the payment, still ``settling``, and say so."""
    changes: dict[str, Any] = {}
    if tx_hash and tx_hash != payment.tx_hash:
        changes["tx_hash"] = tx_hash
    if response is not None:
        changes["response"] = response
    if changes:
        with UnitOfWork(rt.engine) as uow:
            current = uow.session.get(Payment, payment.id)
            if current is not None and current.state == S.SETTLING.value:
                try:
                    update_fields(uow.session, current, **changes)
                    uow.commit()
                    payment.tx_hash = current.tx_hash
                except ConcurrentUpdate:
                    uow.rollback()
    log.info("settlement pending", extra={"payment_id": payment.id, "tx_hash": tx_hash})
    return SettlementPending(
        f"payment {payment.id}: {reason}; the outcome is not known yet (transaction "
        f"{tx_hash or 'unknown'}), it is retried with the same authorization",
        payment_id=payment.id,
        tx_hash=tx_hash,
    )


def _authorization_used(rt: Runtime, ctx: ConnectionContext, payment: Payment) -> bool:
    try:
        return authorization_used(rt, ctx.rpc_url, payment)
    except ExternalServiceError:
        log.warning("could not read authorization state", extra={"payment_id": payment.id})
        return False


def _finish(
    rt: Runtime,
    payment: Payment,
    step: Step,
    budget_op: Callable[[Session, str], bool],
    on_final: OnFinal | None,
) -> Payment:
    """Take the final step from ``settling`` using the copy in hand (no re-read). If the row
    moved meanwhile (a reconciler or a parallel retry), re-read it: whoever finished first wins.
    """
    # A caller with ``on_final`` records its own job; otherwise jobs waiting on the payment follow.
    follow = on_final is None
    with UnitOfWork(rt.engine) as uow:
        current = payment
        try:
            advance(uow.session, current, [step], follow_jobs=follow)
        except ConcurrentUpdate:
            uow.rollback()
            fresh = uow.session.get(Payment, payment.id)
            assert fresh is not None
            current = fresh
            if current.state != S.SETTLING.value:
                return current
            advance(uow.session, current, [step], follow_jobs=follow)
        budget_op(uow.session, current.id)
        if on_final is not None:
            on_final(uow.session, current)
        uow.commit()
        return current


def _keep(session: Session, payment_id: str) -> bool:
    return False


def _finish_paid(
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    tx_hash: str | None,
    response: dict[str, Any] | None = None,
    on_final: OnFinal | None = None,
) -> Payment:
    """The money left the payer (nonce used, or the settlement's transaction succeeded)."""
    if escrow_sync.is_escrow(payment):
        return _finish_escrow(rt, ctx, payment, tx_hash, response, on_final)
    return _finish_settled(rt, payment, tx_hash, response, on_final)


def _finish_escrow(
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    tx_hash: str | None,
    response: dict[str, Any] | None,
    on_final: OnFinal | None,
) -> Payment:
    """An escrow collection was funded: apply its escrow events, so the payment ends
    ``authorized`` (held) or ``captured`` (charged) with its reservation following the escrow.

    The token saying "nonce used" is not enough to know which: until the escrow's events can be
    read the outcome stays unknown (``settling``, retried; the reconciler reads them too)."""
    if payment.state != S.SETTLING.value:
        return payment
    depth = escrow_sync.confirmations(rt, payment)
    try:
        events, through = escrow_sync.collection_events(
            rt.chain(ctx.rpc_url), payment, tx_hash, depth=depth
        )
    except ExternalServiceError:
        log.warning("escrow events unreadable", extra={"payment_id": payment.id})
        events, through = [], None
    if not events:
        raise _pending(rt, payment, tx_hash, "escrow collection not visible yet", response)
    if not any(e.name in escrow_sync.COLLECTIONS and counts(e, through) for e in events):
        # Mined, not deep enough: the payment stays ``settling`` until its confirmations
        # (the job's retry or the reconciler applies it then), as an ``exact`` one would.
        raise _pending(
            rt, payment, tx_hash, f"escrow collection mined, waiting for {depth} confirmations",
            response,
        )  # fmt: skip

    def then(session: Session, current: Payment) -> None:
        if response is not None:
            update_fields(session, current, response=response)
        if on_final is not None:
            on_final(session, current)

    applied = escrow_sync.apply(rt, payment, events, confirmed_through=through, then=then)
    return applied.payment


def _finish_settled(
    rt: Runtime,
    payment: Payment,
    tx_hash: str | None,
    response: dict[str, Any] | None = None,
    on_final: OnFinal | None = None,
) -> Payment:
    if payment.state != S.SETTLING.value:
        return payment
    changes: dict[str, Any] = {"tx_hash": tx_hash}
    if response is not None:
        changes["response"] = response
    return _finish(rt, payment, Step(S.SETTLED, changes), budgets.confirm, on_final)


def _finish_failed(
    rt: Runtime,
    payment: Payment,
    code: str,
    reason: str,
    *,
    definite: bool,
    response: dict[str, Any] | None = None,
    on_final: OnFinal | None = None,
) -> Payment:
    """Fail the payment. The budget reservation is released only when nothing can move any more;
    otherwise it stays held until the authorization's deadline passes (the reconciler releases it).
    """
    if payment.state != S.SETTLING.value:
        return payment
    changes: dict[str, Any] = {"failure_code": code, "failure_reason": reason[:1000]}
    if response is not None:
        changes["response"] = response
    release = budgets.release if definite else _keep
    return _finish(rt, payment, Step(S.FAILED, changes), release, on_final)
