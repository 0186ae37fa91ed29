"""An outgoing ``authCapture`` payment seen from the payer: where its money is, and taking it back.

``send`` keeps the signed terms (``paymentInfo``) in the stored payload, so the payer can always
ask the escrow what happened to a payment — held, captured, refunded, voided, reclaimed, including
operations nobody told the connector about — and, once the capture deadline has passed, reclaim
whatever is still held with its own key, without the seller, the operator or any facilitator.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from connector.chain.auth_capture import EscrowClient
from connector.chain.client import ChainClient, Receipt, RpcError, TransactionReverted
from connector.errors import EscrowRefused, SettlementPending, ValidationFailed
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac
from connector.x402.errors import ProtocolError
from connector.x402.requirement import requirement_from_wire


@dataclass(frozen=True)
class EscrowView:
    info: ac.PaymentInfo
    deployment: ac.Deployment
    state: ac.EscrowState
    events: list[ac.EscrowEvent]


def terms_of(payment: Payment) -> tuple[ac.PaymentInfo, ac.Deployment]:
    """The escrow terms an ``authCapture`` payment's payer signed, from what is stored: the
    ``paymentInfo`` our ``send`` keeps in its payload, or — for a payer that sends only its
    authorization and salt, as the TypeScript client does to our paywall — rebuilt from the
    requirement and that authorization exactly as the facilitator rebuilds them.
    Raises :class:`~connector.errors.ValidationFailed` when neither is there."""
    wire = payment.signed_payload or {}
    inner = wire.get("payload") if isinstance(wire, dict) else None
    accepted = wire.get("accepted") if isinstance(wire, dict) else None
    if not isinstance(accepted, dict):
        accepted = payment.requirement  # the requirement the payment was made against
    if not isinstance(inner, dict) or not isinstance(accepted, dict):
        raise ValidationFailed(
            f"payment {payment.id} is not an authCapture payment with stored terms",
            field="payment_id",
        )
    extra = accepted.get("extra") if isinstance(accepted.get("extra"), dict) else {}
    deployment = ac.resolve_deployment((extra or {}).get("authCaptureEscrow"))
    if deployment is None:
        raise ValidationFailed("stored terms name an unknown escrow", field="payment_id")
    if "paymentInfo" in inner:
        return ac.payment_info_from_wire(inner["paymentInfo"]), deployment
    try:
        requirement = requirement_from_wire(accepted, 2)
        client = ac.parse_client_payload(inner)
        info = ac.terms_for(
            requirement,
            ac.parse_extra(requirement.extra),
            payer=client.authorization.from_,
            salt=client.salt,
            pre_approval_expiry=client.authorization.valid_before,
        )
    except ProtocolError as exc:
        raise ValidationFailed(
            f"payment {payment.id}: stored escrow terms unreadable ({exc.detail})",
            field="payment_id",
        ) from None
    return info, deployment


def escrow_view(chain: ChainClient, payment: Payment) -> EscrowView:
    """State and event history of the payment in the escrow (every mined event, from the
    payment's lower bound, in ranges the provider accepts)."""
    from connector.payments.escrow_sync import history_start  # it builds on this module

    info, deployment = terms_of(payment)
    escrow = EscrowClient(chain, deployment)
    events = escrow.history(info, from_block=history_start(chain, payment))
    return EscrowView(info, deployment, escrow.state(info), events)


def reclaim(chain: ChainClient, payer: LocalAccount, payment: Payment) -> str:
    """Take back what the escrow still holds for ``payment``; the reclaim transaction's hash.
    See :func:`reclaim_receipt`."""
    return reclaim_receipt(chain, payer, payment).tx_hash


def reclaim_receipt(
    chain: ChainClient, payer: LocalAccount, payment: Payment, *, timeout_s: float = 60.0
) -> Receipt:
    """Take back what the escrow still holds for ``payment`` (the payer's own transaction).

    Simulated first: before the capture deadline, or with nothing held, it raises
    :class:`~connector.errors.EscrowRefused` (a 409 ``Conflict``) naming the escrow's reason and
    sends nothing. A transaction without a receipt within ``timeout_s`` is an unknown outcome:
    :class:`~connector.errors.SettlementPending` carrying its hash (the escrow's events tell
    later whether it landed; a second reclaim of an emptied escrow is refused, so nothing can be
    taken back twice)."""
    info, deployment = terms_of(payment)
    if payer.address != info.payer:
        raise ValidationFailed("only the payer who signed can reclaim", field="payment_id")
    escrow = EscrowClient(chain, deployment)
    data = ac.reclaim_data(info)
    simulation = escrow.simulate(payer.address, data)
    if not simulation.ok:
        raise EscrowRefused(
            f"escrow refuses reclaim: {simulation.reason}",
            reason=simulation.reason,
            payment_id=payment.id,
        )
    tx_hash = escrow.submit(payer, data)
    try:
        receipt = chain.wait_for_receipt(tx_hash, timeout_s=timeout_s)
    except RpcError:
        chain.forget_nonces()
        raise SettlementPending(
            f"reclaim of payment {payment.id} submitted ({tx_hash}); no receipt yet",
            payment_id=payment.id,
            tx_hash=tx_hash,
        ) from None
    if receipt.status != 1:
        raise TransactionReverted("reclaim reverted", tx_hash=receipt.tx_hash)
    return receipt
