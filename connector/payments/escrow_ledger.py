"""An ``authCapture`` payment's ledger, read from the escrow contract, applied to the payment.

The escrow contract is the truth about where the money is. Every escrow operation — ours, the
payer's ``reclaim``, or another operator client's ``capture`` — leaves an event; replaying a
payment's events gives its totals, and the totals decide the payment's headline state
(:mod:`connector.payments.states`). :func:`apply_escrow_events` is the only place that moves an
escrow payment from chain evidence: the actions call it with the events of the operation they
just ran, reconciliation with everything the chain has. Applying the same events twice changes
nothing (each event is keyed by transaction hash and log index), so actions and the reconciler
may race freely. An event counts only once it has the network's confirmations (the caller says
which block is deep enough); a shallower one is skipped and applied by a later call.

Each new escrow event becomes exactly one connector event on the payment: the headline
transition's own event when the operation changes the headline (``authorized``, ``captured``,
``voided``, ``reclaimed``, ``partially_refunded``, ``refunded``), else the operation's event
(``payment.captured`` for a second partial capture, ``payment.voided`` for voiding the rest after
a capture, …) with the same payment snapshot and the amounts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session

from connector.events.outbox import record_events
from connector.payments.machine import Step, advance, update_fields
from connector.payments.states import TRANSITIONS, PaymentState
from connector.payments.views import payment_snapshot
from connector.policy import budgets
from connector.storage.models.payments import Payment
from connector.x402.auth_capture import EscrowEvent

S = PaymentState

#: The connector event for an escrow event that leaves the headline where it was.
_EVENT_FOR_OPERATION = {
    "PaymentAuthorized": "payment.authorized",
    "PaymentCharged": "payment.captured",
    "PaymentCaptured": "payment.captured",
    "PaymentVoided": "payment.voided",
    "PaymentReclaimed": "payment.reclaimed",
    "PaymentRefunded": "payment.partially_refunded",
}


@dataclass(frozen=True)
class EscrowTotals:
    """Cumulative amounts of one payment in the escrow (atomic units)."""

    collected: bool = False
    held: int = 0  # capturable now
    captured: int = 0  # to the receiver, fees included (charge counts as a capture)
    voided: int = 0
    reclaimed: int = 0
    refunded: int = 0

    @property
    def refundable(self) -> int:
        return self.captured - self.refunded

    def after(self, event: EscrowEvent) -> EscrowTotals:
        name, amount = event.name, event.amount
        if name == "PaymentAuthorized":
            return replace(self, collected=True, held=self.held + amount)
        if name == "PaymentCharged":
            return replace(self, collected=True, captured=self.captured + amount)
        if name == "PaymentCaptured":
            return replace(self, held=self.held - amount, captured=self.captured + amount)
        if name == "PaymentVoided":
            return replace(self, held=self.held - amount, voided=self.voided + amount)
        if name == "PaymentReclaimed":
            return replace(self, held=self.held - amount, reclaimed=self.reclaimed + amount)
        if name == "PaymentRefunded":
            return replace(self, refunded=self.refunded + amount)
        return self

    def to_wire(self, seen: Sequence[str]) -> dict[str, Any]:
        return {
            "collected": self.collected,
            "held": str(self.held),
            "captured": str(self.captured),
            "voided": str(self.voided),
            "reclaimed": str(self.reclaimed),
            "refunded": str(self.refunded),
            "refundable": str(self.refundable),
            "seen": list(seen),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> EscrowTotals:
        if not data:
            return cls()
        return cls(
            collected=bool(data.get("collected")),
            held=int(data.get("held", 0)),
            captured=int(data.get("captured", 0)),
            voided=int(data.get("voided", 0)),
            reclaimed=int(data.get("reclaimed", 0)),
            refunded=int(data.get("refunded", 0)),
        )


def headline(totals: EscrowTotals) -> PaymentState | None:
    """The payment state these totals mean (None: nothing collected yet)."""
    if not totals.collected:
        return None
    if totals.captured == 0:
        if totals.held > 0:
            return S.AUTHORIZED
        return S.RECLAIMED if totals.reclaimed > 0 else S.VOIDED
    if totals.refunded == 0:
        return S.CAPTURED
    if totals.refunded >= totals.captured and totals.held == 0:
        return S.REFUNDED
    return S.PARTIALLY_REFUNDED


def collected(payment: Payment) -> bool:
    """True once the escrow collected this payment's funds (authorize or charge seen on-chain):
    from then on ``authorized`` means "held by the contract", not "signed, not sent yet"."""
    return bool((payment.escrow or {}).get("collected"))


def from_block(payment: Payment) -> int:
    """The payment's lower bound: no escrow event of it can be older. Recorded when the payment
    is created (the chain's head then, less a margin), else the block of its first escrow event
    seen; 0 when none is recorded (an older record: see
    :func:`connector.payments.escrow_sync.history_start`)."""
    return int((payment.escrow or {}).get("from_block") or 0)


def scanned_to(payment: Payment) -> int:
    """The last block whose logs a history read covered with every confirmed event of it
    applied (0: none yet): the next read starts after it instead of reading again."""
    return int((payment.escrow or {}).get("scanned_to") or 0)


def last_block(payment: Payment) -> int:
    """The block of the newest escrow event applied (0: none, or an older record)."""
    return int((payment.escrow or {}).get("last_block") or 0)


def counts(event: EscrowEvent, confirmed_through: int | None) -> bool:
    """Whether ``event`` is deep enough to be applied: its block is at most
    ``confirmed_through`` (the head less the network's confirmations, plus one). None: every
    mined event counts (one confirmation: its own block)."""
    return confirmed_through is None or event.block_number <= confirmed_through


def record_scan(session: Session, payment: Payment, through: int, *, start: int = 0) -> None:
    """Remember that the payment's logs were read through block ``through`` (and, for a record
    without a lower bound, from ``start``), in the caller's transaction, under the payment's
    optimistic lock. Never moves backwards."""
    escrow = dict(payment.escrow or {})
    escrow["scanned_to"] = max(scanned_to(payment), through)
    if start and not from_block(payment):
        escrow["from_block"] = start
    if escrow != (payment.escrow or {}):
        update_fields(session, payment, escrow=escrow)


def budget_kept(totals: EscrowTotals) -> int:
    """What an outgoing escrow payment costs the payer's budget: what is still held (it may yet
    be captured) plus what was captured. Voided and reclaimed amounts came back to the payer;
    refunds are the seller's doing and, as for ``exact`` payments, do not restore the budget."""
    return totals.held + totals.captured


def event_key(event: EscrowEvent) -> str:
    return f"{event.tx_hash.lower()}:{event.log_index}"


def seen_keys(payment: Payment) -> list[str]:
    return list((payment.escrow or {}).get("seen") or [])


def totals_of(payment: Payment) -> EscrowTotals:
    return EscrowTotals.from_wire(payment.escrow)


def apply_escrow_events(
    session: Session,
    payment: Payment,
    events: Iterable[EscrowEvent],
    *,
    confirmed_through: int | None,
    now: datetime | None = None,
) -> bool:
    """Apply the escrow events not applied yet, in chain order; True when anything changed.

    Only events deep enough count (:func:`counts`: at most ``confirmed_through``, the newest
    block with the network's confirmations; None when one confirmation is enough). A shallower
    event is left for a later call — the payment stays where it is meanwhile, which is an
    unknown, never a failure — exactly as an ``exact`` settlement waits for its confirmations.

    One versioned write and one outbox event per new escrow event (so a payment's events keep
    the chain's order and each snapshot shows the amounts after its operation), in the caller's
    transaction. An outgoing payment's budget reservation follows the totals in the same
    transaction (:func:`connector.policy.budgets.follow_escrow`): held or captured money counts,
    voided or reclaimed money is given back — an absolute write, so applying twice or racing
    another applier cannot give anything back twice. Raises
    :class:`~connector.errors.ConcurrentUpdate` when the payment moved meanwhile (re-read it and
    apply again: applied events are skipped).
    """
    now = now or datetime.now(UTC)
    seen = seen_keys(payment)
    known = set(seen)
    fresh = sorted(
        (e for e in events if event_key(e) not in known and counts(e, confirmed_through)),
        key=lambda e: (e.block_number, e.log_index),
    )
    totals = totals_of(payment)
    first_block = from_block(payment) or min((e.block_number for e in fresh), default=0)
    for event in fresh:
        totals = totals.after(event)
        seen.append(event_key(event))
        changes = {
            # Keys the totals do not own (the operator's in-flight operations, ``ops``; how far
            # the history was read, ``scanned_to``) stay.
            "escrow": {
                **(payment.escrow or {}),
                **totals.to_wire(seen),
                "from_block": first_block,
                "last_block": max(last_block(payment), event.block_number),
            },
            "captured_amount": totals.captured,
            "refunded_amount": max(payment.refunded_amount, totals.refunded),
            "tx_hash": payment.tx_hash or event.tx_hash,
        }
        detail = {
            "escrow_operation": {
                "name": event.name,
                "amount": str(event.amount),
                "tx_hash": event.tx_hash,
                "block_number": event.block_number,
                "fee_bps": event.fee_bps,
                "fee_receiver": event.fee_receiver,
            }
        }
        state = PaymentState(payment.state)
        target = headline(totals)
        if state == PaymentState.FAILED and target is not None and target != state:
            # A correction (the escrow shows a collection given up as failed funded after all):
            # it did not fail, so the failure goes with the move, and the jobs that follow the
            # payment in this write see it cleared.
            changes.update(failure_code=None, failure_reason=None)
        if target is not None and target != state:
            # A reconcile that sees several operations at once walks every state in between.
            hops = _path(state, target)
            steps = [Step(hop) for hop in hops[:-1]] + [Step(hops[-1], changes, detail)]
            advance(session, payment, steps, now=now)
        else:
            update_fields(session, payment, now=now, **changes)
            record_events(
                session,
                [
                    (
                        _EVENT_FOR_OPERATION[event.name],
                        payment.connection_id,
                        {"payment": payment_snapshot(payment), **detail},
                        payment.id,
                    )
                ],
            )
    if fresh and payment.direction == "outgoing":
        budgets.follow_escrow(
            session, payment.id, kept=budget_kept(totals), held=totals.held > 0, now=now
        )
    return bool(fresh)


def _path(current: PaymentState, target: PaymentState) -> list[PaymentState]:
    """The shortest chain of legal edges from ``current`` to ``target`` (escrow states only)."""
    frontier: list[list[PaymentState]] = [[current]]
    visited = {current}
    while frontier:
        path = frontier.pop(0)
        for nxt in sorted(TRANSITIONS[path[-1]], key=lambda s: s.value):
            if nxt in visited:
                continue
            if nxt == target:
                return [*path[1:], nxt]
            if nxt in _ESCROW_WAYPOINTS:
                visited.add(nxt)
                frontier.append([*path, nxt])
    # No legal path: let the machine refuse it loudly (IllegalTransition) rather than guess.
    return [target]


#: States an escrow payment may pass through on the way to the one the chain says.
_ESCROW_WAYPOINTS = frozenset({S.SETTLING, S.AUTHORIZED, S.CAPTURED, S.PARTIALLY_REFUNDED})
