"""The public shape of a payment: what events, API responses and action results carry.

Amounts are decimal strings in atomic units (never floats); the signed payload is never included
(it is a bearer instrument until settled).
"""

from __future__ import annotations

from typing import Any

from connector.storage.models.payments import Payment


def payment_snapshot(payment: Payment) -> dict[str, Any]:
    return {
        "id": payment.id,
        "object": "payment",
        "connection_id": payment.connection_id,
        "direction": payment.direction,
        "state": payment.state,
        "amount": str(payment.amount),
        "refunded_amount": str(payment.refunded_amount),
        "captured_amount": str(payment.captured_amount),
        "escrow": _escrow_view(payment.escrow),
        "asset": payment.asset,
        "network": payment.network,
        "payer": payment.payer,
        "payee": payment.payee,
        "scheme": payment.scheme,
        "x402_version": payment.x402_version,
        "resource_url": payment.resource_url,
        "description": payment.description,
        "payment_request_id": payment.payment_request_id,
        "capture": payment.capture,
        "custodial": payment.custodial,
        "beneficiary": payment.beneficiary,
        "nonce": payment.nonce,
        "valid_before": payment.valid_before.isoformat() if payment.valid_before else None,
        "hold_expires_at": (
            payment.hold_expires_at.isoformat() if payment.hold_expires_at else None
        ),
        "tx_hash": payment.tx_hash,
        "release_tx_hash": payment.release_tx_hash,
        "failure_code": payment.failure_code,
        "failure_reason": payment.failure_reason,
        "idempotency_key": payment.idempotency_key,
        "dry_run": payment.dry_run,
        "response": payment.response,
        "metadata": payment.metadata_,
        "created_at": payment.created_at.isoformat(),
        "updated_at": payment.updated_at.isoformat(),
        "version": payment.version,
    }


def _escrow_view(ledger: dict[str, Any] | None) -> dict[str, Any] | None:
    """The escrow amounts of an on-chain escrow payment (None for any other payment)."""
    if not ledger:
        return None
    amounts = {k: v for k, v in ledger.items() if k not in _LEDGER_INTERNAL}
    # An operation recorded before any escrow event was applied leaves no amounts yet.
    return amounts if "held" in amounts else None


#: Ledger keys that are not amounts: applied event keys, the payment's lower bound, how far its
#: history was read, the block of its newest applied event, the operator's in-flight operations.
_LEDGER_INTERNAL = frozenset({"seen", "from_block", "scanned_to", "last_block", "ops"})
