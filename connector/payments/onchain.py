"""What the chain says about a payment's authorization: the evidence reconciliation relies on."""

from __future__ import annotations

from connector.runtime import Runtime
from connector.storage.models.payments import Payment


def authorization_used(rt: Runtime, rpc_url: str, payment: Payment) -> bool:
    """True once the payment's EIP-3009 nonce is used on-chain (the money moved).

    Raises :class:`~connector.errors.ExternalServiceError` when the chain cannot be read, so
    callers decide between "unknown" and "not used" themselves.
    """
    if not payment.nonce or not payment.payer:
        return False
    return bool(rt.chain(rpc_url).authorization_state(payment.asset, payment.payer, payment.nonce))
