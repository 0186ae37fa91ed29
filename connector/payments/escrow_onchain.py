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
from connector.chain.client import ChainClient, TransactionReverted
from connector.errors import Conflict, ValidationFailed
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac


@dataclass(frozen=True)
class EscrowView:
    info: ac.PaymentInfo
    deployment: ac.Deployment
    state: ac.EscrowState
    events: list[ac.EscrowEvent]


def terms_of(payment: Payment) -> tuple[ac.PaymentInfo, ac.Deployment]:
    """The escrow terms an outgoing ``authCapture`` payment signed, from its stored payload."""
    wire = payment.signed_payload or {}
    inner = wire.get("payload") if isinstance(wire, dict) else None
    accepted = wire.get("accepted") if isinstance(wire, dict) else None
    if not isinstance(inner, dict) or "paymentInfo" not in inner or not isinstance(accepted, dict):
        raise ValidationFailed(
            f"payment {payment.id} is not an authCapture payment with stored terms",
            field="payment_id",
        )
    extra = accepted.get("extra") if isinstance(accepted.get("extra"), dict) else {}
    deployment = ac.resolve_deployment((extra or {}).get("authCaptureEscrow"))
    if deployment is None:
        raise ValidationFailed("stored terms name an unknown escrow", field="payment_id")
    return ac.payment_info_from_wire(inner["paymentInfo"]), deployment


def escrow_view(chain: ChainClient, payment: Payment) -> EscrowView:
    """State and event history of the payment in the escrow (two reads)."""
    info, deployment = terms_of(payment)
    escrow = EscrowClient(chain, deployment)
    return EscrowView(info, deployment, escrow.state(info), escrow.history(info))


def reclaim(chain: ChainClient, payer: LocalAccount, payment: Payment) -> str:
    """Take back what the escrow still holds for ``payment`` (the payer's own transaction).

    Simulated first: before the capture deadline, or with nothing held, it raises
    :class:`~connector.errors.Conflict` naming the escrow's reason and sends nothing."""
    info, deployment = terms_of(payment)
    if payer.address != info.payer:
        raise ValidationFailed("only the payer who signed can reclaim", field="payment_id")
    escrow = EscrowClient(chain, deployment)
    data = ac.reclaim_data(info)
    simulation = escrow.simulate(payer.address, data)
    if not simulation.ok:
        raise Conflict(
            f"escrow refuses reclaim: {simulation.reason}",
            reason=simulation.reason,
            payment_id=payment.id,
        )
    receipt = escrow.execute(payer, data)
    if receipt.status != 1:
        raise TransactionReverted("reclaim reverted", tx_hash=receipt.tx_hash)
    return receipt.tx_hash
