"""The ``receive`` action and the paywall it creates.

A payment request (``prq_…``) is an offer: price, asset, network, capture mode. Its paywall URL
answers every x402 client: without payment, 402 carrying both the v2 ``PAYMENT-REQUIRED`` header
and the v1 JSON body; with payment, verify (automatic capture: here, in full, chain included,
:mod:`connector.payments.preverify`; manual capture: through the facilitator), then settle
(automatic capture) or hold (manual capture), then deliver the resource with the settlement
header.

A single-use request can be paid once: the slot is claimed with a conditional update
(``paid_count < max_payments``) *before* any settlement, so a second payer is refused before
money moves. If settlement then fails, the slot is given back.

A request may instead offer on-chain escrow (``authCapture``, x402 v2): the payer signs once to
the escrow's token collector, the facilitator (the escrow's operator) authorizes (the contract
holds the funds) or, with automatic capture, charges; the payment's state then comes from the
escrow events of that transaction (:mod:`connector.payments.escrow_operator`). The claim, the
unknown-outcome rule and the 503 ``Retry-After`` answer are the same as for ``exact``.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

import connector.payments.protocol as proto
from connector.actions.schemas import EscrowTermsView, PaymentRequestView, ReceiveInput
from connector.errors import ConcurrentUpdate, ConnectorError, NotFound, WalletKeyMissing
from connector.facilitator.client import FacilitatorError
from connector.ids import new_id
from connector.logs import get_logger
from connector.payments import escrow_operator, escrow_sync, offers
from connector.payments.claim import record_and_claim
from connector.payments.context import ConnectionContext
from connector.payments.machine import (
    Step,
    advance_alone,
    transition,
    update_fields,
    writes_alone,
)
from connector.payments.onchain import SETTLEMENT_PENDING, outcome
from connector.payments.preverify import verify_for_claim
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, PaymentRequest
from connector.x402 import auth_capture as ac
from connector.x402.fields import checksum

log = get_logger(__name__)
S = PaymentState

#: A hold is dropped this long before the payer's authorization stops being settleable.
HOLD_SAFETY_MARGIN = timedelta(seconds=60)


def create_request(
    rt: Runtime, ctx: ConnectionContext, inp: ReceiveInput, now: datetime | None = None
) -> PaymentRequest:
    now = now or datetime.now(UTC)
    network = proto.normalize_network(inp.network or ctx.network)
    asset, token_name, token_version = proto.asset_for(rt, ctx, network, inp.asset)
    pay_to = checksum(inp.pay_to) if inp.pay_to else ctx.receiving_address
    if inp.custodial and not ctx.holds_key_for(pay_to):
        # Custodial escrow forwards the money later: that transfer is signed by pay_to's key.
        raise WalletKeyMissing(
            f"custodial escrow needs the key of {pay_to} to release or refund; this connection "
            "holds none for it",
            connection_id=ctx.id,
            address=pay_to,
        )
    capture = inp.capture or ctx.capture_default
    scheme = escrow_operator.choose_scheme(rt, ctx, inp, network, capture)
    terms = None
    if scheme == ac.SCHEME:
        terms = escrow_operator.offer_terms(rt, ctx, inp, network, now)
    request = PaymentRequest(
        id=new_id("prq"),
        connection_id=ctx.id,
        amount=int(inp.amount),
        asset=asset,
        network=network,
        pay_to=pay_to,
        token_name=token_name,
        token_version=token_version,
        description=inp.description,
        mime_type=inp.mime_type,
        resource=inp.resource,
        redirect_url=inp.redirect_url,
        max_timeout_seconds=inp.max_timeout_seconds,
        capture=capture,
        custodial=inp.custodial,
        beneficiary=inp.beneficiary,
        max_payments=inp.max_payments,
        # authCapture is a v2 scheme: its paywall speaks v2 only.
        protocols="v2" if terms is not None else inp.protocols,
        scheme=scheme,
        escrow_terms=terms,
        expires_at=now + timedelta(seconds=inp.expires_in_s),
        created_at=now,
    )
    with UnitOfWork(rt.engine) as uow:
        uow.session.add(request)
        uow.commit()
    return request


def paywall_url(rt: Runtime, request_id: str) -> str:
    return offers.paywall_url(rt, request_id)


def _requirement(rt: Runtime, request: PaymentRequest) -> proto.Requirement:
    """The requirement a request's paywall offers (kept for callers of the earlier name)."""
    return offers.requirement_of(rt, request)


def request_view(rt: Runtime, request: PaymentRequest) -> PaymentRequestView:
    return PaymentRequestView(
        id=request.id,
        url=paywall_url(rt, request.id),
        amount=str(request.amount),
        asset=request.asset,
        network=request.network,
        pay_to=request.pay_to,
        protocols=request.protocols,
        scheme=ac.SCHEME if request.scheme in ac.SCHEME_ALIASES else "exact",
        escrow_terms=(
            EscrowTermsView.model_validate(request.escrow_terms) if request.escrow_terms else None
        ),
        capture=request.capture,
        custodial=request.custodial,
        max_payments=request.max_payments,
        paid_count=request.paid_count,
        status=request.status,
        expires_at=request.expires_at.isoformat() if request.expires_at else None,
    )


@dataclass
class PaywallAnswer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    redirect_url: str | None = None
    payment_id: str | None = None
    #: The body already rendered as JSON (the cached 402 offer); wins over ``body``.
    content: bytes | None = None


#: What the paywall tells a payer whose settlement is still unknown (try again with the same
#: payment: the same authorization resumes the same payment, it is never charged twice).
PENDING_RETRY_AFTER_S = 5


def _payment_required(offer: offers.Offer, error: str | None) -> PaywallAnswer:
    if error is None:
        return PaywallAnswer(402, dict(offer.headers_402), content=offer.body_402)
    headers, body = proto.payment_required_response(
        offer.requirement,
        offer.url,
        offer.request.description,
        error,
        offer.request.protocols,
        offer.alternatives,
    )
    return PaywallAnswer(402, headers, body)


def _closed_reason(offer: offers.Offer, state: offers.OfferState, now: datetime) -> str | None:
    if state.status != "open":
        return f"payment request is {state.status}"
    if offer.expires_at is not None and offer.expires_at <= now:
        return "payment request expired"
    if state.paid_count >= state.max_payments:
        return "payment request already paid"
    return None


def _unpaid(offer: offers.Offer, state: offers.OfferState, now: datetime) -> PaywallAnswer:
    closed = _closed_reason(offer, state, now)
    if closed:
        return PaywallAnswer(410, body={"error": closed})
    return _payment_required(offer, None)


def unpaid_from_memory(
    rt: Runtime, request_id: str, now: datetime | None = None
) -> PaywallAnswer | None:
    """An unpaid hit answered without the database, or None when the offer or its state must be
    (re)read first. Cheap enough to run on the event loop."""
    cache = offers.cache_for(rt)
    offer = cache.cached(request_id)
    state = cache.state(request_id)
    if offer is None or state is None:
        return None
    return _unpaid(offer, state, now or datetime.now(UTC))


def _connection(rt: Runtime, offer: offers.Offer) -> ConnectionContext:
    from connector.payments.context_loader import load_connection

    return offers.cache_for(rt).connection(
        offer.connection_id, lambda: load_connection(rt, offer.connection_id)
    )


def handle_paywall(
    rt: Runtime,
    ctx: ConnectionContext | None,
    request_id: str,
    headers: Mapping[str, str],
    now: datetime | None = None,
) -> PaywallAnswer:
    """Answer one paywall hit: a 402 offer, or verify + claim + settle/hold + deliver.

    Never oversold, with no lock held across the payment: the slot is claimed by a conditional
    ``UPDATE ... WHERE paid_count < max_payments`` that is the *last* statement of the
    transaction recording the authorized payment, so the row lock lasts only for that commit and
    the claim is durable before any money can move. A definite settlement failure gives the slot
    back in the same transaction that marks the payment failed; an unknown outcome (facilitator
    unreachable or timing out, ``settlement_pending``) keeps both the claim and the payment in
    ``settling`` until the chain answers (the reconciler, or the payer retrying the same
    authorization).

    ``ctx`` is the request's connection when the caller has it; None reads it (cached for the
    state TTL) only when a payment needs the facilitator.
    """
    now = now or datetime.now(UTC)
    incoming = proto.read_payment_header(headers, auth_capture=True)
    cache = offers.cache_for(rt)
    offer, state = cache.offer(rt, request_id)
    if incoming is None:
        return _unpaid(offer, state, now)
    requirement = offer.requirement_for(incoming.scheme)
    escrow = ac.is_auth_capture(requirement)
    protocols = offer.request.protocols
    if protocols != "both" and protocols != f"v{incoming.version}":
        offered = f"x402 version {incoming.version} is not offered here ({protocols})"
        return _payment_required(offer, offered)
    try:
        payload = proto.check_incoming(incoming, requirement)
    except ConnectorError as exc:
        return _payment_required(offer, exc.detail)
    closed = _closed_reason(offer, state, now)
    if closed and state.paid_count >= state.max_payments and not cache.fresh_from_db(state):
        # Paid out as far as this process knows: the count is only authoritative in the
        # database (another process may have given a slot back), so read it before refusing.
        offer, state = cache.offer(rt, request_id, refresh=True)
        closed = _closed_reason(offer, state, now)
    if closed:  # maybe this very payment, retried: answer it as it stands
        earlier = _earlier_payment(rt, offer, payload)
        return _resume(rt, offer, earlier, ctx=ctx) if earlier else _payment_required(offer, closed)

    ctx = ctx or _connection(rt, offer)
    wire_requirement = proto.requirement_to_wire(requirement, payload.version)
    if escrow:  # the facilitator is told which escrow operation: authorize (hold) or charge
        facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
        asked = escrow_operator.collection_payload(payload.wire, requirement)
        verdict = facilitator.verify(asked, wire_requirement)
    else:
        # exact, automatic capture: checked here in full, chain included; /settle verifies again
        # before sending (decision 0012). A hold: the facilitator's /verify vouches for it.
        verdict = verify_for_claim(
            rt, ctx, incoming, requirement, wire_requirement, capture=offer.request.capture
        )
    if not verdict.get("isValid"):
        earlier = _earlier_payment(rt, offer, payload)  # nonce used: by us, for this payer?
        if earlier is not None:
            return _resume(rt, offer, earlier, ctx=ctx)
        return _payment_required(offer, str(verdict.get("invalidReason") or "invalid"))

    request = offer.request
    payment = Payment(
        id=new_id("pay"),
        connection_id=offer.connection_id,
        direction="incoming",
        state=S.CREATED.value,
        amount=request.amount,
        asset=request.asset,
        network=request.network,
        payer=payload.payer,
        payee=request.pay_to,
        scheme=ac.SCHEME if escrow else "exact",
        x402_version=payload.version,
        resource_url=offer.url,
        description=request.description,
        payment_request_id=request.id,
        capture=request.capture,
        custodial=request.custodial,
        beneficiary=request.beneficiary,
        nonce=payload.nonce,
        valid_before=payload.valid_before,
        requirement=wire_requirement,
        signed_payload=payload.wire,
    )
    if escrow:
        # On-chain escrow: the collection goes to the facilitator at once; ``authorized`` (held
        # by the contract) or ``captured`` (charged) comes from the chain's events afterwards.
        # No ``hold_expires_at``: the escrow's capture deadline governs the hold, not ours.
        # Its history is read from a lower bound recorded now (the head, less a margin): no
        # event of it can be older, and providers refuse log queries from genesis.
        bound = escrow_sync.bound_fields(rt.chain(ctx.rpc_url))
        steps = [Step(S.SETTLING, {"settle_attempts": 1, **bound})]
    else:
        steps = [
            Step(
                S.AUTHORIZED,
                {
                    "hold_expires_at": payload.valid_before - HOLD_SAFETY_MARGIN
                    if request.capture == "manual"
                    else None
                },
            )
        ]
        if request.capture == "automatic":
            steps.append(Step(S.SETTLING, {"settle_attempts": 1}))
    try:  # the payment and its slot, committed together before any money moves
        claimed = record_and_claim(rt, payment, steps, request.id, now)
    except IntegrityError:
        earlier = _earlier_payment(rt, offer, payload)
        if earlier is not None:
            return _resume(rt, offer, earlier, ctx=ctx)
        return _payment_required(offer, "this authorization was already used")
    if claimed is None:
        cache.offer(rt, request.id)  # refresh what unpaid visitors see
        return _payment_required(offer, "payment request already paid")
    cache.note(request.id, *claimed)

    if request.capture == "manual" and not escrow:
        return _deliver(offer, payment, _settlement(payment, ""))
    return _resume(rt, offer, payment, ctx=ctx)


#: States in which the payer has paid (money moved to the payee, possibly refunded since; or,
#: on-chain escrow, captured by the contract for the receiver).
_DELIVERED = frozenset(
    s.value
    for s in (
        S.SETTLED,
        S.RELEASED,
        S.REFUNDING,
        S.PARTIALLY_REFUNDED,
        S.REFUNDED,
        S.CAPTURED,
    )
)


def _settlement(payment: Payment, tx_hash: str) -> dict[str, Any]:
    return {
        "success": True,
        "transaction": tx_hash,
        "network": payment.network,
        "payer": payment.payer,
    }


def _earlier_payment(rt: Runtime, offer: offers.Offer, payload: proto.Incoming) -> Payment | None:
    """The payment this paywall already recorded for this very authorization, if any."""
    with UnitOfWork(rt.engine) as uow:
        found = uow.session.execute(
            select(Payment).where(
                col(Payment.payment_request_id) == offer.id,
                col(Payment.nonce) == payload.nonce,
                col(Payment.direction) == "incoming",
            )
        ).scalar_one_or_none()
        if found is not None and (found.payer or "").lower() != payload.payer.lower():
            return None
        return found


def _resume(
    rt: Runtime,
    offer: offers.Offer,
    payment: Payment,
    *,
    ctx: ConnectionContext | None = None,
) -> PaywallAnswer:
    """Take a recorded payment as far as it goes and answer the payer: deliver once settled (or
    held), ask again while the outcome is unknown, refuse once it definitely failed."""
    if payment.state == S.SETTLING.value:
        payment = settle_incoming(rt, ctx or _connection(rt, offer), payment.id, payment=payment)
    state = payment.state
    if state in _DELIVERED:
        return _deliver(offer, payment, _settlement(payment, payment.tx_hash or ""))
    if state == S.AUTHORIZED.value:  # a hold (on-chain escrow: its authorize transaction)
        return _deliver(offer, payment, _settlement(payment, payment.tx_hash or ""))
    if state == S.SETTLING.value:
        # Neither paid nor refused: the payer retries with the very same payment header and gets
        # the resource once the chain has it (nothing moves twice).
        headers = proto.settlement_headers(
            payment.x402_version or 2,
            {
                "success": False,
                "errorReason": SETTLEMENT_PENDING,
                "transaction": payment.tx_hash or "",
                "network": payment.network,
                "payer": payment.payer,
            },
        )
        headers["retry-after"] = str(PENDING_RETRY_AFTER_S)
        headers["x-x402c-payment-id"] = payment.id
        return PaywallAnswer(
            503,
            headers,
            {
                "error": SETTLEMENT_PENDING,
                "detail": "the settlement's outcome is not known yet; retry with the same payment",
                "status": SETTLEMENT_PENDING,
                "payment_id": payment.id,
            },
            payment_id=payment.id,
        )
    return _payment_required(offer, payment.failure_reason or f"payment {state}")


def _deliver(offer: offers.Offer, payment: Payment, settlement: dict[str, Any]) -> PaywallAnswer:
    request = offer.request
    headers = proto.settlement_headers(payment.x402_version or 2, settlement)
    headers["x-x402c-payment-id"] = payment.id
    if request.redirect_url:
        return PaywallAnswer(302, headers, None, request.redirect_url, payment.id)
    body = request.resource if request.resource is not None else {"paid": True}
    return PaywallAnswer(200, headers, body, None, payment.id)


#: Final states in which no money moved: what the payment held is freed when it enters them.
UNMOVED = frozenset({S.FAILED, S.EXPIRED, S.VOIDED})


def end_unmoved(
    session: Session,
    payment: Payment,
    target: PaymentState,
    *,
    now: datetime | None = None,
    **changes: Any,
) -> Payment:
    """End a payment where no money moved (failed, expired, voided) and free what it held: an
    outgoing payment's budget reservation, an incoming one's paywall slot. One call, in the
    caller's transaction, so the freeing happens exactly once, with the transition."""
    if target not in UNMOVED:
        raise ValueError(f"{target} is not a state where nothing moved")
    transition(session, payment, target, now=now, **changes)
    if payment.direction == "outgoing":
        budgets.release(session, payment.id)
    give_back_slot(session, payment)
    return payment


def give_back_slot(session: Session, payment: Payment) -> None:
    """Free the paywall slot a definitely failed incoming payment held (in the caller's
    transaction, the one that marks the payment failed, so it happens exactly once)."""
    if payment.direction != "incoming" or not payment.payment_request_id:
        return
    session.execute(
        update(PaymentRequest)
        .where(
            col(PaymentRequest.id) == payment.payment_request_id,
            col(PaymentRequest.paid_count) > 0,
        )
        .values(paid_count=col(PaymentRequest.paid_count) - 1)
    )


def settle_incoming(
    rt: Runtime, ctx: ConnectionContext, payment_id: str, *, payment: Payment | None = None
) -> Payment:
    """Settle an incoming payment that is in ``settling`` (automatic capture or release).

    Success: ``settled``. An unsuccessful answer is decided from the chain, never from the answer
    alone (:func:`connector.payments.onchain.outcome`): a used nonce is settled; a submitted
    transaction without a receipt, ``settlement_pending`` or an unreadable chain is unknown; only
    a definite refusal is ``failed``, and its paywall slot is given back in that transaction.
    A facilitator that cannot be reached, times out or answers 5xx/429 leaves the outcome
    unknown too. Unknown: the payment stays in ``settling`` (the submitted transaction recorded)
    with its slot held, for the reconciler or a retry; it is never called a failure.
    """
    if payment is None:
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, payment_id)
            if payment is None:
                raise NotFound(f"payment {payment_id} not found")
    if payment.state != S.SETTLING.value:
        return payment
    if escrow_operator.is_escrow(payment):  # authorize/charge into the escrow contract
        return escrow_operator.collect(rt, ctx, payment)
    assert payment.signed_payload is not None and payment.requirement is not None
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    try:
        answer = facilitator.settle(payment.signed_payload, payment.requirement)
    except FacilitatorError as exc:
        status = exc.context.get("status_code")
        definite = isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)
        if not definite:
            log.warning(
                "incoming settlement outcome unknown",
                extra={"payment_id": payment.id, "reason": exc.detail[:200]},
            )
            return payment
        answer = {"success": False, "errorReason": exc.detail}
    tx_hash = str(answer.get("transaction") or "") or None
    reason = str(answer.get("errorReason") or "facilitator refused")
    settled, unknown = bool(answer.get("success")), False
    if not settled:
        verdict = outcome(rt, ctx, payment, tx_hash, pending=reason == SETTLEMENT_PENDING)
        settled, unknown, tx_hash = verdict.settled, verdict.unknown, verdict.tx_hash
    if unknown:
        log.warning(
            "incoming settlement pending", extra={"payment_id": payment.id, "tx_hash": tx_hash}
        )
    if settled and writes_alone(rt.engine):  # the common case, in one round trip
        step = Step(S.SETTLED, {"tx_hash": tx_hash or payment.tx_hash})
        with suppress(ConcurrentUpdate):  # moved meanwhile: the unit of work below re-reads it
            if advance_alone(rt.engine, payment, [step]):
                return payment
    current = payment
    with UnitOfWork(rt.engine) as uow:
        try:
            _record_settlement(uow.session, current, settled, unknown, tx_hash, reason)
        except ConcurrentUpdate:  # moved by someone else (reconciler, a retry): use theirs
            uow.rollback()
            fresh = uow.session.get(Payment, payment.id, populate_existing=True)
            assert fresh is not None
            if fresh.state != S.SETTLING.value:
                return fresh
            current = fresh
            _record_settlement(uow.session, current, settled, unknown, tx_hash, reason)
        uow.commit()
    if current.payment_request_id and current.state == S.FAILED.value:
        offers.cache_for(rt).forget_state(current.payment_request_id)
    return current


def _record_settlement(
    session: Session,
    payment: Payment,
    settled: bool,
    unknown: bool,
    tx_hash: str | None,
    reason: str,
) -> None:
    if settled:
        transition(session, payment, S.SETTLED, tx_hash=tx_hash or payment.tx_hash)
    elif unknown:
        if tx_hash and tx_hash != payment.tx_hash:
            update_fields(session, payment, tx_hash=tx_hash)
    else:
        end_unmoved(
            session,
            payment,
            S.FAILED,
            failure_code="settlement_failed",
            failure_reason=reason[:1000],
        )
