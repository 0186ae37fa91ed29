"""What the chain says about a payment's authorization: the evidence reconciliation relies on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from connector.errors import ExternalServiceError
from connector.logs import get_logger
from connector.payments.context import ConnectionContext
from connector.runtime import Runtime
from connector.storage.models.payments import Payment

log = get_logger(__name__)
#: A facilitator's answer when it submitted a transfer but saw no receipt in time.
SETTLEMENT_PENDING = "settlement_pending"


def authorization_used(rt: Runtime, rpc_url: str, payment: Payment) -> bool:
    """True once the payment's EIP-3009 nonce is used on-chain (the money moved).

    Raises :class:`~connector.errors.ExternalServiceError` when the chain cannot be read, so
    callers decide between "unknown" and "not used" themselves.
    """
    if not payment.nonce or not payment.payer:
        return False
    return bool(rt.chain(rpc_url).authorization_state(payment.asset, payment.payer, payment.nonce))


@dataclass(frozen=True)
class Outcome:
    """What the chain says about an attempt: settled, unknown (wait), or neither (failed)."""

    settled: bool
    unknown: bool
    tx_hash: str | None  # the transaction submitted for it, when one is known


def outcome(
    rt: Runtime,
    ctx: ConnectionContext,
    payment: Payment,
    tx_hash: str | None,
    *,
    pending: bool,
    nonce: str | None = None,
    signer: str | None = None,
) -> Outcome:
    """Decide an unsuccessful settle answer from the chain, never from the answer alone.

    A used nonce means the money moved. A transaction that was submitted (the answer's, or one
    recorded by an earlier attempt) without a receipt, an answer that says ``pending``, or a
    chain that cannot be read: the outcome is unknown. ``nonce``/``signer`` select another
    authorization of the payment (a refund's, an escrow release's).
    """
    submitted = tx_hash or (payment.tx_hash if nonce is None else None)
    chain = rt.chain(ctx.rpc_url)
    try:
        used = chain.authorization_state(
            payment.asset, signer or payment.payer or "", nonce or payment.nonce or ""
        )
        if used:
            return Outcome(True, False, submitted)
        receipt = chain.get_receipt(submitted) if submitted else None
    except ExternalServiceError:
        log.warning("chain unreadable: outcome unknown", extra={"payment_id": payment.id})
        return Outcome(False, True, submitted)
    if submitted is not None:
        if receipt is None:
            return Outcome(False, True, submitted)  # in the mempool (or dropped): wait
        if receipt.status == 1:  # mined between the two reads
            return Outcome(True, False, submitted)
        return Outcome(False, False, submitted)  # reverted: definite
    return Outcome(False, pending, None)


def can_never_move(rt: Runtime, rpc_url: str, valid_before: datetime | None, now: datetime) -> bool:
    """True when an unused authorization can no longer be used: its ``validBefore`` has passed
    by the wall clock *and* by the chain's own clock (the token checks ``block.timestamp``; on a
    stalled chain the next block may still be older than the deadline). Raises
    :class:`~connector.errors.ExternalServiceError` when the chain cannot be read."""
    if valid_before is None:
        return False
    deadline = valid_before if valid_before.tzinfo else valid_before.replace(tzinfo=UTC)
    if deadline > now:
        return False
    return int(rt.chain(rpc_url).latest_block_timestamp()) >= int(deadline.timestamp())
