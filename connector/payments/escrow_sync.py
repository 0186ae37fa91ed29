"""Bring an ``authCapture`` payment's record in line with the escrow contract.

The escrow is the truth about where an on-chain escrow payment's money is. Three callers read it
and apply what they find with :func:`connector.payments.escrow_ledger.apply_escrow_events` (the
one function that moves such a payment from chain evidence):

* ``send`` once its collection is funded: the events of the settlement transaction (its
  receipt), so the payment ends ``authorized`` (held) or ``captured`` (charged);
* the payer's ``reclaim``: the events of the reclaim transaction;
* reconciliation: the payment's event history, read as of one block together with
  ``paymentState`` so the two can be compared (:func:`read`).

Two rules of real networks shape every read:

* **Bounded log ranges.** Providers refuse ``eth_getLogs`` over more than a few thousand
  blocks. A payment records a lower bound when it is created (:func:`lower_bound`: the head then,
  less :data:`BOUND_MARGIN_BLOCKS`); its history is read from there, or from where the last read
  stopped (``escrow.scanned_to``), in ranges of ``X402C_RPC_MAX_LOG_RANGE`` blocks — never from
  genesis.
* **Confirmations.** An event counts once the head is the network's confirmations deep
  (``X402C_NETWORK_CONFIRMATIONS``, else the registry's default; 1 on the dev chain): reads are
  taken as of ``head - confirmations + 1`` and shallower events wait for a later read, the
  payment staying where it is meanwhile (unknown, never failed).

This module does the chain reads and the write with its retry; the rules live in the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eth_account import Account
from sqlmodel import Session

from connector.chain.auth_capture import EscrowClient, EscrowSnapshot, block_before, snapshots
from connector.chain.client import ChainClient
from connector.errors import (
    ConcurrentUpdate,
    ExternalServiceError,
    NotFound,
    SettlementPending,
    ValidationFailed,
)
from connector.logs import get_logger
from connector.metrics import ESCROW_MISMATCHES
from connector.payments import escrow_ledger as ledger
from connector.payments.confirmations import required_confirmations
from connector.payments.context import ConnectionContext
from connector.payments.escrow_onchain import reclaim_receipt, terms_of
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac

log = get_logger(__name__)
COLLECTIONS = frozenset({"PaymentAuthorized", "PaymentCharged"})

#: How far below the head read at a payment's creation its history is still read: nodes behind
#: one load balancer disagree on the head by a few blocks, and a shallow reorganization may
#: include the collection lower than the head we saw. Costs nothing: it is part of one range.
BOUND_MARGIN_BLOCKS = 64
#: A record without a lower bound (written before bounds existed, or whose creation could not
#: read the chain) is read from the block this long before its creation: the connector's clock
#: and the chain's may differ a little.
BOUND_MARGIN_S = 3_600


def is_escrow(payment: Payment) -> bool:
    """An on-chain escrow (``authCapture``) payment: its state comes from the escrow's events."""
    return payment.scheme in ac.SCHEME_ALIASES


def client_for(chain: ChainClient, payment: Payment) -> tuple[EscrowClient, ac.PaymentInfo]:
    """The escrow client of the deployment the payment's terms name, and the terms.
    Raises :class:`~connector.errors.ValidationFailed` when no terms are stored."""
    info, deployment = terms_of(payment)
    return EscrowClient(chain, deployment), info


# --------------------------------------------------------------------------------- depth


def confirmations(rt: Runtime, payment: Payment) -> int:
    """Blocks an escrow event of ``payment`` needs (its own included) before it counts."""
    return required_confirmations(rt.settings, payment.network)


def confirmed_block(chain: ChainClient, depth: int) -> int | None:
    """The newest block whose events count now, ``head - depth + 1`` (one ``eth_blockNumber``);
    None when one confirmation is enough: a mined event counts, nothing to read."""
    if depth <= 1:
        return None
    return int(chain.block_number()) - depth + 1


# --------------------------------------------------------------------------------- bounds


def lower_bound(chain: ChainClient) -> int | None:
    """The lower bound of an escrow payment created now: no event of it can be older than the
    head, read now, less :data:`BOUND_MARGIN_BLOCKS` (at least block 1: nothing happens in
    genesis). None when the chain cannot be read: the bound is then found from the payment's
    creation time at its first history read (:func:`history_start`)."""
    try:
        head = int(chain.block_number())
    except ExternalServiceError:
        log.info("escrow payment created without a lower bound: chain unreadable")
        return None
    return max(1, head - BOUND_MARGIN_BLOCKS)


def bound_fields(chain: ChainClient) -> dict[str, Any]:
    """The payment fields that record a new escrow payment's lower bound (none when the chain
    cannot be read), for the write that creates it."""
    bound = lower_bound(chain)
    return {"escrow": {"from_block": bound}} if bound else {}


def history_start(chain: ChainClient, payment: Payment) -> int:
    """The block the payment's history starts at: its recorded lower bound, else (an older
    record) the last block mined :data:`BOUND_MARGIN_S` before it was created, found by the
    blocks' timestamps, less :data:`BOUND_MARGIN_BLOCKS` — never genesis to ``latest``."""
    recorded = ledger.from_block(payment)
    if recorded:
        return recorded
    created = payment.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    before = block_before(chain, int(created.timestamp()) - BOUND_MARGIN_S)
    return max(1, before - BOUND_MARGIN_BLOCKS)


def read_start(chain: ChainClient, payment: Payment) -> int:
    """Where the next history read of the payment starts: after the last block read with every
    confirmed event applied, else at its lower bound."""
    scanned = ledger.scanned_to(payment)
    return scanned + 1 if scanned else history_start(chain, payment)


# --------------------------------------------------------------------------------- reads


def collection_events(
    chain: ChainClient, payment: Payment, tx_hash: str | None, *, depth: int
) -> tuple[list[ac.EscrowEvent], int | None]:
    """The escrow events that funded ``payment`` and the newest block that counts (None: every
    mined block): those of its settlement transaction when that transaction is known and
    carries them, else the payment's history (the server named no transaction, or another one
    collected it). No events when the escrow shows no collection yet; callers apply only those
    deep enough (:func:`connector.payments.escrow_ledger.counts`). Raises
    :class:`~connector.errors.ExternalServiceError` when the chain cannot be read."""
    escrow, info = client_for(chain, payment)
    if tx_hash:
        receipt = chain.get_receipt(tx_hash)
        if receipt is not None and receipt.status == 1:
            events = escrow.events_in(receipt, info)
            if any(e.name in COLLECTIONS for e in events):
                return events, confirmed_block(chain, depth)
    snapshot = read(chain, payment, depth=depth)
    events = snapshot.events
    return (events if any(e.name in COLLECTIONS for e in events) else []), snapshot.block


def read(chain: ChainClient, payment: Payment, *, depth: int) -> EscrowSnapshot:
    """``paymentState`` and the events of ``payment`` as of one block (``head - depth + 1``);
    the events are read from :func:`read_start` to the head, those after that block being
    mined but not confirmed. See :func:`read_many`."""
    return read_many(chain, [payment], depth=depth)[payment.id]


def read_many(
    chain: ChainClient, payments: Sequence[Payment], *, depth: int
) -> dict[str, EscrowSnapshot]:
    """:func:`read` for many payments on one chain, all as of the same block, in a few JSON-RPC
    batches. When a read covers a payment's whole history (from its lower bound, through the
    state's block), a replay of its confirmed events that disagrees with ``paymentState`` is
    logged and counted (``kind="events"``): an event we cannot see or decode, which only an
    operator can explain. Raises :class:`~connector.errors.ValidationFailed` for a payment
    without stored terms (callers filter those first) and ExternalServiceError when the chain
    cannot be read."""
    requests = []
    for payment in payments:
        escrow, info = client_for(chain, payment)
        requests.append((escrow, info, read_start(chain, payment)))
    found: dict[str, EscrowSnapshot] = {}
    read_all = snapshots(chain, requests, confirmations=depth)
    for payment, snapshot in zip(payments, read_all, strict=True):
        whole = not ledger.scanned_to(payment) and snapshot.scanned_to >= snapshot.block
        replayed = ac.state_from_events(snapshot.confirmed)
        if whole and replayed != snapshot.state:
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
    confirmed_through: int | None,
    scan: EscrowSnapshot | None = None,
    now: datetime | None = None,
    then: Any = None,
) -> Applied:
    """Apply ``events`` deep enough to count (at most ``confirmed_through``; None: every mined
    one) in a transaction of its own, with ``then(session, payment)`` (the caller's own write: a
    job's outcome, jobs to report to) in the same commit when anything changed. ``scan``: the
    history read the events come from, whose progress is remembered (:func:`remember_scan`).

    A concurrent writer (the reconciler, a job retry, another helper's action) makes the
    versioned write fail: the payment is read again and the events applied again (those already
    applied are skipped), so whoever is first wins and nothing is counted twice."""
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
                changed = ledger.apply_escrow_events(
                    uow.session, current, events, confirmed_through=confirmed_through, now=now
                )
                if scan is not None:
                    remember_scan(rt, uow.session, current, scan, changed)
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


def apply_read(
    rt: Runtime,
    payment: Payment,
    snapshot: EscrowSnapshot,
    *,
    now: datetime | None = None,
    then: Any = None,
) -> Applied:
    """Apply what a history read found (its confirmed events) and remember how far it read."""
    return apply(
        rt, payment, snapshot.events, confirmed_through=snapshot.block, scan=snapshot, now=now,
        then=then,
    )  # fmt: skip


def remember_scan(
    rt: Runtime, session: Session, payment: Payment, scan: EscrowSnapshot, changed: bool
) -> None:
    """Record that the payment's logs were read through ``min(scanned_to, block)`` — the part
    of the read whose events all count, so all are applied — so the next read starts after it.

    Not on every read: a write per payment per reconcile pass would cost more than reading a
    few hundred blocks again, which is one ``eth_getLogs`` either way. It is written with
    applied events (the same transaction), when the read found the record's missing lower
    bound, and when the reads have moved on by half a range since the last record."""
    through = min(scan.scanned_to, scan.block)
    if through < scan.start:
        return  # nothing read that counts yet
    known = ledger.scanned_to(payment) or ledger.from_block(payment)
    stride = max(1, rt.settings.rpc_max_log_range // 2)
    if changed or not ledger.from_block(payment) or through - known >= stride:
        ledger.record_scan(session, payment, through, start=scan.start)


def check_ledger(payment: Payment, snapshot: EscrowSnapshot) -> None:
    """Compare the stored ledger with ``paymentState`` as of the snapshot's block, when the
    comparison means something: the ledger and the read together cover the payment's history
    through that block, and the ledger holds nothing newer (a node behind another). A
    disagreement is logged and counted (``kind="ledger"``): an applied event that a
    reorganization removed, a hand edit."""
    if snapshot.scanned_to < snapshot.block or ledger.last_block(payment) > snapshot.block:
        return
    if not ledger_matches(payment, snapshot.state):
        mismatch(payment, "ledger", ledger.totals_of(payment), snapshot.state, snapshot.block)


def sync(rt: Runtime, chain: ChainClient, payment: Payment) -> tuple[Applied, EscrowSnapshot]:
    """Read the payment's escrow (state and events as of one block) and apply what counts."""
    snapshot = read(chain, payment, depth=confirmations(rt, payment))
    applied = apply_read(rt, payment, snapshot)
    check_ledger(applied.payment, snapshot)
    return applied, snapshot


def reclaim_payment(rt: Runtime, ctx: ConnectionContext, payment_id: str) -> Payment:
    """The ``reclaim`` action: the payer takes back, with the connection's own wallet key, what
    the escrow still holds for an outgoing ``authCapture`` payment after its capture deadline.

    Repeatable: the escrow is read first, so a reclaim that already happened (this action's
    earlier attempt, or the payer's wallet outside the connector) is recorded and answered
    without sending anything. The reclaim's event is applied in the transaction that records it,
    giving the reclaimed amount back to the budget there. While the escrow shows operations not
    yet confirmed (this reclaim's, or anyone's), or could not be read through the head, the
    answer is pending (:class:`~connector.errors.SettlementPending`, retried): nothing is sent
    on a picture that may be out of date."""
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
    depth = confirmations(rt, payment)
    applied, snapshot = sync(rt, chain, payment)
    payment = applied.payment
    totals = ledger.totals_of(payment)
    if totals.collected and totals.held == 0 and totals.reclaimed > 0:
        return payment  # already reclaimed: the same answer as the first time
    if snapshot.unconfirmed or not snapshot.complete:
        raise SettlementPending(
            f"payment {payment_id}: the escrow shows operations not confirmed yet (or its "
            "history is still being read); the reclaim waits for them",
            payment_id=payment_id,
        )
    receipt = reclaim_receipt(
        chain, Account.from_key(key.key), payment, timeout_s=rt.settings.receipt_timeout_s
    )
    escrow, info = client_for(chain, payment)
    events = escrow.events_in(receipt, info)
    through = confirmed_block(chain, depth)
    payment = apply(rt, payment, events, confirmed_through=through).payment
    if any(not ledger.counts(e, through) for e in events):
        raise SettlementPending(
            f"reclaim of payment {payment_id} mined in block {receipt.block_number}; it counts "
            f"once {depth} confirmations are reached",
            payment_id=payment_id,
            tx_hash=receipt.tx_hash,
        )
    return payment
