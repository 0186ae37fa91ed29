"""The ``receive`` action and the paywall it creates.

A payment request (``prq_…``) is an offer: price, asset, network, capture mode. Its paywall URL
answers every x402 client: without payment, 402 carrying both the v2 ``PAYMENT-REQUIRED`` header
and the v1 JSON body; with payment, verify through the facilitator, then settle (automatic
capture) or hold (manual capture), then deliver the resource with the settlement header.

A single-use request can be paid once: the slot is claimed with a conditional update
(``paid_count < max_payments``) *before* any settlement, so a second payer is refused before
money moves. If settlement then fails, the slot is given back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

import connector.payments.protocol as proto
from connector.actions.schemas import PaymentRequestView, ReceiveInput
from connector.errors import ConnectorError, NotFound, WalletKeyMissing
from connector.ids import new_id
from connector.logs import get_logger
from connector.payments.context import ConnectionContext
from connector.payments.machine import insert_payment, transition, update_fields
from connector.payments.onchain import SETTLEMENT_PENDING, outcome
from connector.payments.states import PaymentState
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment, PaymentRequest
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
        capture=inp.capture or ctx.capture_default,
        custodial=inp.custodial,
        beneficiary=inp.beneficiary,
        max_payments=inp.max_payments,
        protocols=inp.protocols,
        expires_at=now + timedelta(seconds=inp.expires_in_s),
        created_at=now,
    )
    with UnitOfWork(rt.engine) as uow:
        uow.session.add(request)
        uow.commit()
    return request


def paywall_url(rt: Runtime, request_id: str) -> str:
    return f"{rt.settings.public_base_url.rstrip('/')}/pay/{request_id}"


def request_view(rt: Runtime, request: PaymentRequest) -> PaymentRequestView:
    return PaymentRequestView(
        id=request.id,
        url=paywall_url(rt, request.id),
        amount=str(request.amount),
        asset=request.asset,
        network=request.network,
        pay_to=request.pay_to,
        protocols=request.protocols,
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


def _requirement(rt: Runtime, request: PaymentRequest) -> proto.Requirement:
    return proto.Requirement(
        scheme="exact",
        network=request.network,
        amount=request.amount,
        asset=request.asset,
        pay_to=request.pay_to,
        max_timeout_seconds=request.max_timeout_seconds,
        extra={"name": request.token_name, "version": request.token_version},
        resource=paywall_url(rt, request.id),
        description=request.description,
        mime_type=request.mime_type,
    )


def _payment_required(rt: Runtime, request: PaymentRequest, error: str | None) -> PaywallAnswer:
    headers, body = proto.payment_required_response(
        _requirement(rt, request),
        paywall_url(rt, request.id),
        request.description,
        error,
        request.protocols,
    )
    return PaywallAnswer(402, headers, body)


def _load_open(session: Session, request_id: str, now: datetime) -> PaymentRequest:
    request = session.get(PaymentRequest, request_id)
    if request is None:
        raise NotFound(f"payment request {request_id} not found")
    return request


def _closed_reason(request: PaymentRequest, now: datetime) -> str | None:
    if request.status != "open":
        return f"payment request is {request.status}"
    if request.expires_at is not None and request.expires_at <= now:
        return "payment request expired"
    if request.paid_count >= request.max_payments:
        return "payment request already paid"
    return None


def handle_paywall(
    rt: Runtime,
    ctx: ConnectionContext,
    request_id: str,
    headers: Mapping[str, str],
    now: datetime | None = None,
) -> PaywallAnswer:
    """Answer one paywall hit: a 402 offer, or verify + settle/hold + deliver."""
    now = now or datetime.now(UTC)
    with UnitOfWork(rt.engine) as uow:
        request = _load_open(uow.session, request_id, now)
    closed = _closed_reason(request, now)
    incoming = proto.read_payment_header(headers)
    if incoming is None:
        if closed:
            return PaywallAnswer(410, body={"error": closed})
        return _payment_required(rt, request, None)
    requirement = _requirement(rt, request)
    if request.protocols != "both" and request.protocols != f"v{incoming.version}":
        offered = f"x402 version {incoming.version} is not offered here ({request.protocols})"
        return _payment_required(rt, request, offered)
    try:
        payload = proto.check_incoming(incoming, requirement)
    except ConnectorError as exc:
        return _payment_required(rt, request, closed or exc.detail)
    if closed:
        # A single-use request paid by this very authorization: the payer is retrying.
        return _replayed(rt, ctx, request, payload) or _payment_required(rt, request, closed)

    wire_requirement = proto.requirement_to_wire(requirement, payload.version)
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    verdict = facilitator.verify(payload.wire, wire_requirement)
    if not verdict.get("isValid"):
        return _payment_required(rt, request, str(verdict.get("invalidReason") or "invalid"))

    # Claim a slot and record the authorization before anything settles.
    with UnitOfWork(rt.engine) as uow:
        claimed = uow.session.execute(
            update(PaymentRequest)
            .where(
                col(PaymentRequest.id) == request.id,
                col(PaymentRequest.paid_count) < col(PaymentRequest.max_payments),
            )
            .values(paid_count=col(PaymentRequest.paid_count) + 1)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            uow.rollback()
            replay = _replayed(rt, ctx, request, payload)
            return replay or _payment_required(rt, request, "payment request already paid")
        payment = Payment(
            id=new_id("pay"),
            connection_id=ctx.id,
            direction="incoming",
            state=S.CREATED.value,
            amount=request.amount,
            asset=request.asset,
            network=request.network,
            payer=payload.payer,
            payee=request.pay_to,
            x402_version=payload.version,
            resource_url=paywall_url(rt, request.id),
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
        try:
            insert_payment(uow.session, payment, now=now)
        except IntegrityError:
            uow.rollback()
            replay = _replayed(rt, ctx, request, payload)
            if replay is not None:
                return replay
            return _payment_required(rt, request, "this authorization was already used")
        hold_until = None
        if request.capture == "manual":
            hold_until = payload.valid_before - HOLD_SAFETY_MARGIN
        transition(uow.session, payment, S.AUTHORIZED, now=now, hold_expires_at=hold_until)
        if request.capture == "automatic":
            transition(uow.session, payment, S.SETTLING, now=now, settle_attempts=1)
        uow.commit()

    if request.capture == "manual":
        answer = _deliver(
            request,
            payment,
            {
                "success": True,
                "transaction": "",
                "network": request.network,
                "payer": payload.payer,
            },
        )
        return answer

    return _answer_settled(rt, ctx, request, payment.id, payload.payer, give_back=True)


def _answer_settled(
    rt: Runtime,
    ctx: ConnectionContext,
    request: PaymentRequest,
    payment_id: str,
    payer: str,
    *,
    give_back: bool,
) -> PaywallAnswer:
    """Settle (or re-check) the payment and answer: delivered, pending (503, retry with the same
    payment), or refused (402, the slot given back when this call claimed it)."""
    settled = settle_incoming(rt, ctx, payment_id)
    if settled.state == S.SETTLING.value:
        # Submitted, not mined yet: neither paid nor refused. The payer retries with the very
        # same payment header and gets the resource once the chain has it (nothing moves twice).
        body = {"error": SETTLEMENT_PENDING, "payment_id": settled.id}
        headers = proto.settlement_headers(
            settled.x402_version or 2,
            {
                "success": False,
                "errorReason": SETTLEMENT_PENDING,
                "transaction": settled.tx_hash or "",
                "network": request.network,
                "payer": payer,
            },
        )
        headers["retry-after"] = "2"
        return PaywallAnswer(503, headers, body, payment_id=settled.id)
    if settled.state not in (S.SETTLED.value, S.REFUNDING.value, S.PARTIALLY_REFUNDED.value):
        if give_back and settled.state == S.FAILED.value:
            _give_back_slot(rt, request.id)
        return _payment_required(rt, request, settled.failure_reason or "settlement failed")
    return _deliver(
        request,
        settled,
        {
            "success": True,
            "transaction": settled.tx_hash or "",
            "network": request.network,
            "payer": payer,
        },
    )


def _replayed(
    rt: Runtime, ctx: ConnectionContext, request: PaymentRequest, payload: proto.Incoming
) -> PaywallAnswer | None:
    """The same authorization presented again (a payer retrying after a pending answer or a lost
    response): answer from the payment it already made, never a second one."""
    with UnitOfWork(rt.engine) as uow:
        found = uow.session.execute(
            select(Payment).where(
                col(Payment.direction) == "incoming",
                col(Payment.payment_request_id) == request.id,
                col(Payment.payer) == payload.payer,
                col(Payment.nonce) == payload.nonce,
            )
        ).scalar_one_or_none()
    if not isinstance(found, Payment):
        return None
    return _answer_settled(rt, ctx, request, found.id, payload.payer, give_back=False)


def _deliver(
    request: PaymentRequest, payment: Payment, settlement: dict[str, Any]
) -> PaywallAnswer:
    headers = proto.settlement_headers(payment.x402_version or 2, settlement)
    headers["x-x402c-payment-id"] = payment.id
    if request.redirect_url:
        return PaywallAnswer(302, headers, None, request.redirect_url, payment.id)
    body = request.resource if request.resource is not None else {"paid": True}
    return PaywallAnswer(200, headers, body, None, payment.id)


def _give_back_slot(rt: Runtime, request_id: str) -> None:
    with UnitOfWork(rt.engine) as uow:
        uow.session.execute(
            update(PaymentRequest)
            .where(col(PaymentRequest.id) == request_id, col(PaymentRequest.paid_count) > 0)
            .values(paid_count=col(PaymentRequest.paid_count) - 1)
        )
        uow.commit()


def settle_incoming(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    """Settle an incoming payment that is in ``settling`` (automatic capture or release).

    Returns the payment still in ``settling`` (with the submitted transaction recorded) when the
    outcome is unknown: a submitted transfer is never reported as failed.
    """
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
        if payment is None:
            raise NotFound(f"payment {payment_id} not found")
    if payment.state != S.SETTLING.value:
        return payment
    assert payment.signed_payload is not None and payment.requirement is not None
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    answer = facilitator.settle(payment.signed_payload, payment.requirement)
    tx_hash = str(answer.get("transaction") or "") or None
    reason = str(answer.get("errorReason") or "facilitator refused")
    settled = bool(answer.get("success"))
    unknown = False
    if not settled:
        verdict = outcome(rt, ctx, payment, tx_hash, pending=reason == SETTLEMENT_PENDING)
        settled, unknown, tx_hash = verdict.settled, verdict.unknown, verdict.tx_hash
    with UnitOfWork(rt.engine) as uow:
        current = uow.session.get(Payment, payment_id)
        assert current is not None
        if current.state != S.SETTLING.value:
            return current
        if settled:
            transition(uow.session, current, S.SETTLED, tx_hash=tx_hash or current.tx_hash)
        elif unknown:
            if tx_hash and tx_hash != current.tx_hash:
                update_fields(uow.session, current, tx_hash=tx_hash)
        else:
            transition(
                uow.session,
                current,
                S.FAILED,
                failure_code="settlement_failed",
                failure_reason=reason[:1000],
            )
        uow.commit()
        return current
