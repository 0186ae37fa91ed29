"""Watch settlements until they are final: a receipt that disappears puts the payment back.

A settled payment's transaction can be undone by a chain reorganization until it has enough
confirmations (the network's default from :mod:`connector.x402.networks`, 1 on the dev chain).
:func:`recheck_settlements` looks at recently settled payments again: while the receipt is
there it does nothing; when the receipt is gone and the authorization is unused on the chain,
the payment goes back to ``settling`` (edge ``settled -> settling``), and the reconciler settles
it again with the very same signed authorization, so the money still moves exactly once (an
outgoing payment's budget reservation goes back to ``held`` until then). If the authorization
was used by another transaction meanwhile (re-included elsewhere), that one is recorded instead,
as ``settled -> settling -> settled`` in one write (two events, the second with the new hash).
Either way the jobs that reported the payment follow it in the same transaction
(:func:`connector.actions.outcome.follow_payment`, run by the state machine).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlmodel import col

from connector.errors import ConcurrentUpdate, ExternalServiceError, IllegalTransition
from connector.logs import get_logger
from connector.payments.machine import Step, advance
from connector.payments.onchain import authorization_used
from connector.payments.states import PaymentState
from connector.policy import budgets
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment
from connector.x402.errors import UnknownNetwork
from connector.x402.networks import default_confirmations, lookup, to_caip2

log = get_logger(__name__)
S = PaymentState

#: How long after settling a payment is rechecked at least (deep reorgs are rarer than this).
MIN_WINDOW = timedelta(minutes=10)


def required_confirmations(settings: Settings, network: str) -> int:
    """Blocks a transaction on ``network`` needs (its own included) before the connector counts
    it: the operator's ``X402C_NETWORK_CONFIRMATIONS`` entry, else the registry's default (1 on
    the dev chain and on sequencer chains)."""
    try:
        key = to_caip2(network)
    except UnknownNetwork:
        return 1
    return settings.network_confirmations.get(key) or default_confirmations(key)


def finality_window(network: str, confirmations: int | None = None) -> timedelta:
    """Recheck for ten times the time its confirmations take (the network's default unless
    given), and never less than MIN_WINDOW."""
    known = lookup(network)
    block_time = known.block_time_s if known else 2.0
    depth = confirmations or default_confirmations(network)
    return max(MIN_WINDOW, timedelta(seconds=10 * block_time * depth))


def recheck_settlements(rt: Runtime, now: datetime | None = None, limit: int = 500) -> int:
    """Returns how many settled payments went back to ``settling``."""
    from connector.payments.context_loader import load_connection

    now = now or datetime.now(UTC)
    with UnitOfWork(rt.engine) as uow:
        recent = (
            uow.session.execute(
                select(Payment)
                .where(
                    col(Payment.state) == S.SETTLED.value,
                    col(Payment.tx_hash).is_not(None),
                    col(Payment.updated_at) >= now - MIN_WINDOW * 6,
                )
                .order_by(col(Payment.updated_at).desc())
                .limit(limit)
            )
            .scalars()
            .all()
        )
    reverted = 0
    for payment in recent:
        depth = required_confirmations(rt.settings, payment.network)
        if payment.updated_at < now - finality_window(payment.network, depth):
            continue
        try:
            ctx = load_connection(rt, payment.connection_id)
            chain = rt.chain(ctx.rpc_url)
            receipt = chain.get_receipt(str(payment.tx_hash))
            if receipt is not None and receipt.status == 1:
                continue
            used = authorization_used(rt, ctx.rpc_url, payment)
            other = (
                chain.find_authorization_tx(payment.asset, str(payment.payer), str(payment.nonce))
                if used
                else None
            )
        except ExternalServiceError:
            log.warning("recheck: chain unreadable", extra={"payment_id": payment.id})
            continue  # unknown is not "gone": look again next time
        try:
            with UnitOfWork(rt.engine) as uow:
                current = uow.session.get(Payment, payment.id)
                if current is None or current.state != S.SETTLED.value:
                    continue
                vanished = str(current.tx_hash)
                back = Step(
                    S.SETTLING,
                    {"tx_hash": None, "failure_reason": f"receipt of {vanished} vanished (reorg)"},
                    {"vanished_tx_hash": vanished},
                )
                if used and other:
                    if other == vanished:
                        continue  # the same transaction, mined again: nothing changed
                    # Re-included elsewhere: settled again, by another transaction.
                    advance(
                        uow.session, current, [back, Step(S.SETTLED, {"tx_hash": other})], now=now
                    )
                elif not used:
                    log.warning(
                        "settlement receipt vanished (chain reorganization)",
                        extra={"payment_id": current.id, "tx_hash": vanished},
                    )
                    advance(uow.session, current, [back], now=now)
                    if current.direction == "outgoing":
                        budgets.unconfirm(uow.session, current.id)
                    reverted += 1
                else:
                    continue  # used, but by a transaction not found yet: look again next time
                uow.commit()
        except (ConcurrentUpdate, IllegalTransition):
            continue
    return reverted
