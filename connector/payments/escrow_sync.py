"""Bring an ``authCapture`` payment's record in line with the escrow contract.

The escrow is the truth about where an on-chain escrow payment's money is. Three callers read it
and apply what they find with :func:`connector.payments.escrow_ledger.apply_escrow_events` (the
one function that moves such a payment from chain evidence):

* ``send`` once its collection is funded: the events of the settlement transaction (its
  receipt), so the payment ends ``authorized`` (held) or ``captured`` (charged);
* reconciliation: the payment's whole event history, read at one block together with
  ``paymentState`` so the two can be compared (:func:`read`).

This module does the chain reads and the write with its retry; the rules live in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connector.chain.auth_capture import EscrowClient, EscrowSnapshot
from connector.chain.client import ChainClient
from connector.errors import ConcurrentUpdate
from connector.logs import get_logger
from connector.metrics import ESCROW_MISMATCHES
from connector.payments import escrow_ledger as ledger
from connector.payments.escrow_onchain import terms_of
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
    escrow, info = client_for(chain, payment)
    snapshot = escrow.snapshot(info, from_block=ledger.from_block(payment))
    replayed = ac.state_from_events(snapshot.events)
    if replayed != snapshot.state:
        mismatch(payment, "events", replayed, snapshot.state, snapshot.block)
    return snapshot


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

