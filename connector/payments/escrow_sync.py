"""Bring an ``authCapture`` payment's record in line with the escrow contract.

The escrow is the truth about where an on-chain escrow payment's money is. Three callers read it
and apply what they find with :func:`connector.payments.escrow_ledger.apply_escrow_events` (the
one function that moves such a payment from chain evidence):

* ``send`` once its collection is funded: the events of the settlement transaction (its
  receipt), so the payment ends ``authorized`` (held) or ``captured`` (charged);
* the payer's ``reclaim``: the events of the reclaim transaction;
* reconciliation: the payment's whole event history, read at one block together with
  ``paymentState`` so the two can be compared (:func:`read`).

This module does the chain reads and the write with its retry; the rules live in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eth_account import Account

from connector.chain.auth_capture import EscrowClient, EscrowSnapshot, snapshots
from connector.chain.client import ChainClient
from connector.errors import ConcurrentUpdate, NotFound, ValidationFailed
from connector.logs import get_logger
from connector.metrics import ESCROW_MISMATCHES
from connector.payments import escrow_ledger as ledger
from connector.payments.context import ConnectionContext
from connector.payments.escrow_onchain import reclaim_receipt, terms_of
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac

log = get_logger(__name__)
COLLECTIONS = frozenset({"PaymentAuthorized", "PaymentCharged"})


def is_escrow(payment: Payment) -> bool:
    """An on-chain escrow (``authCapture``) payment: its state comes from the escrow's events."""
    return payment.scheme in ac.SCHEME_ALIASES


def client_for(chain: ChainClient, payment: Payment) -> tuple[EscrowClient, ac.PaymentInfo]:
    """The escrow client of the deployment the payment's terms name, and the terms.
    Raises :class:`~connector.errors.ValidationFailed` when no terms are stored."""
    info, deployment = terms_of(payment)
    return EscrowClient(chain, deployment), info


def collection_events(
    chain: ChainClient, payment: Payment, tx_hash: str | None
) -> list[ac.EscrowEvent]:
    """The escrow events that funded ``payment``: those of its settlement transaction when that
    transaction is known and carries them, else the payment's history (the server named no
    transaction, or another one collected it). Empty when the escrow shows no collection yet.
    Raises :class:`~connector.errors.ExternalServiceError` when the chain cannot be read."""
    escrow, info = client_for(chain, payment)
    if tx_hash:
        receipt = chain.get_receipt(tx_hash)
        if receipt is not None and receipt.status == 1:
            events = escrow.events_in(receipt, info)
            if any(e.name in COLLECTIONS for e in events):
                return events
    events = escrow.history(info, from_block=ledger.from_block(payment))
    return events if any(e.name in COLLECTIONS for e in events) else []


def read(chain: ChainClient, payment: Payment) -> EscrowSnapshot:
    """``paymentState`` and the events of ``payment`` at one block; a replay of the events that
    disagrees with ``paymentState`` is logged and counted (``kind="events"``): an event we
    cannot see or decode, which only an operator can explain."""
    return read_many(chain, [payment])[payment.id]


def read_many(chain: ChainClient, payments: Sequence[Payment]) -> dict[str, EscrowSnapshot]:
    """:func:`read` for many payments on one chain, all at the same block, in a few JSON-RPC
    batches. Raises :class:`~connector.errors.ValidationFailed` for a payment without stored
    terms (callers filter those first) and ExternalServiceError when the chain cannot be read."""
    requests = []
    for payment in payments:
        escrow, info = client_for(chain, payment)
        requests.append((escrow, info, ledger.from_block(payment)))
    found: dict[str, EscrowSnapshot] = {}
    for payment, snapshot in zip(payments, snapshots(chain, requests), strict=True):
        replayed = ac.state_from_events(snapshot.events)
        if replayed != snapshot.state:
            mismatch(payment, "events", replayed, snapshot.state, snapshot.block)
        found[payment.id] = snapshot
    return found


def ledger_matches(payment: Payment, state: ac.EscrowState) -> bool:
    """Whether the payment's stored ledger says what the escrow's ``paymentState`` says."""
    totals = ledger.totals_of(payment)
    return (
        totals.collected == state.has_collected_payment
        and totals.held == state.capturable_amount
        and totals.refundable == state.refundable_amount
    )


def mismatch(
    payment: Payment, kind: str, ours: Any, chain_state: ac.EscrowState, block: int
) -> None:
    ESCROW_MISMATCHES.labels(kind=kind).inc()
    log.warning(
        "escrow reconcile: records disagree with paymentState",
        extra={
            "payment_id": payment.id,
            "kind": kind,
            "ours": repr(ours),
            "chain": repr(chain_state),
            "block": block,
        },
    )


@dataclass(frozen=True)
class Applied:
    payment: Payment
    changed: bool  # new escrow events were applied by this call
    previous: str  # the payment's state before them


def apply(
    rt: Runtime,
    payment: Payment,
    events: Sequence[ac.EscrowEvent],
    *,
    now: datetime | None = None,
    then: Any = None,
) -> Applied:
    """Apply ``events`` in a transaction of its own, with ``then(session, payment)`` (the
    caller's own write: a job's outcome, jobs to report to) in the same commit when anything
    changed. A concurrent writer (the reconciler, a job retry, another helper's action) makes
    the versioned write fail: the payment is read again and the events applied again (those
    already applied are skipped), so whoever is first wins and nothing is counted twice."""
    now = now or datetime.now(UTC)
    current = payment
    for attempt in range(3):
        with UnitOfWork(rt.engine) as uow:
            if attempt:
                fresh = uow.session.get(Payment, payment.id)
                assert fresh is not None
                current = fresh
            previous = current.state
            try:
                changed = ledger.apply_escrow_events(uow.session, current, events, now=now)
                if changed and then is not None:
                    then(uow.session, current)
                uow.commit()
            except ConcurrentUpdate:
                uow.rollback()
                continue
            return Applied(current, changed, previous)
    raise ConcurrentUpdate(
        f"payment {payment.id} kept changing while its escrow events were applied",
        payment_id=payment.id,
    )


def sync(rt: Runtime, chain: ChainClient, payment: Payment) -> Applied:
    """Read the payment's escrow (state and events at one block) and apply what is new."""
    snapshot = read(chain, payment)
    applied = apply(rt, payment, snapshot.events)
    if not ledger_matches(applied.payment, snapshot.state):
        mismatch(
            applied.payment, "ledger", ledger.totals_of(applied.payment), snapshot.state,
            snapshot.block,
        )  # fmt: skip
    return applied


def reclaim_payment(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    """The ``reclaim`` action: the payer takes back, with the connection's own wallet key, what
    the escrow still holds for an outgoing ``authCapture`` payment after its capture deadline.

    Repeatable: the escrow is read first, so a reclaim that already happened (this action's
    earlier attempt, or the payer's wallet outside the connector) is recorded and answered
    without sending anything. The reclaim's event is applied in the transaction that records it,
    giving the reclaimed amount back to the budget there."""
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    if payment is None or payment.connection_id != ctx.id:
        raise NotFound(f"payment {payment_id} not found on connection {ctx.id}")
    if payment.direction != "outgoing" or not is_escrow(payment):
        raise ValidationFailed(
            f"payment {payment_id} is not an outgoing authCapture payment: nothing to reclaim",
            field="payment_id",
        )
    key = ctx.account_for(payment.payer or "", "a reclaim")
    chain = rt.chain(ctx.rpc_url)
    payment = sync(rt, chain, payment).payment
    totals = ledger.totals_of(payment)
    if totals.collected and totals.held == 0 and totals.reclaimed > 0:
        return payment  # already reclaimed: the same answer as the first time
    receipt = reclaim_receipt(
        chain, Account.from_key(key.key), payment, timeout_s=rt.settings.receipt_timeout_s
    )
    escrow, info = client_for(chain, payment)
    return apply(rt, payment, escrow.events_in(receipt, info)).payment
