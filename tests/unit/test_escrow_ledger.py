"""The escrow ledger: totals replayed from escrow events decide an authCapture payment's state."""

from __future__ import annotations

import pytest

from connector.payments.escrow_ledger import EscrowTotals, _path, budget_kept, headline
from connector.payments.states import PaymentState as S
from connector.payments.states import can_transition
from connector.x402.auth_capture import EscrowEvent


def ev(name: str, amount: int, i: int = 0) -> EscrowEvent:
    return EscrowEvent(name=name, amount=amount, tx_hash=f"0x{i:064x}", block_number=i, log_index=0)


def replay(*events: EscrowEvent) -> EscrowTotals:
    totals = EscrowTotals()
    for event in events:
        totals = totals.after(event)
    return totals


@pytest.mark.parametrize(
    ("events", "state"),
    [
        ((), None),
        ((ev("PaymentAuthorized", 100),), S.AUTHORIZED),
        ((ev("PaymentCharged", 100),), S.CAPTURED),
        ((ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30)), S.CAPTURED),
        ((ev("PaymentAuthorized", 100), ev("PaymentVoided", 100)), S.VOIDED),
        ((ev("PaymentAuthorized", 100), ev("PaymentReclaimed", 100)), S.RECLAIMED),
        (
            (ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30), ev("PaymentRefunded", 10)),
            S.PARTIALLY_REFUNDED,
        ),
        (
            (ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30), ev("PaymentRefunded", 30)),
            S.PARTIALLY_REFUNDED,  # 70 still held: not everything is back with the payer
        ),
        (
            (
                ev("PaymentAuthorized", 100),
                ev("PaymentCaptured", 30),
                ev("PaymentVoided", 70),
                ev("PaymentRefunded", 30),
            ),
            S.REFUNDED,
        ),
    ],
)
def test_headline_follows_the_totals(events: tuple[EscrowEvent, ...], state: S | None) -> None:
    assert headline(replay(*events)) == state


def test_totals_round_trip_through_the_stored_ledger() -> None:
    totals = replay(
        ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30), ev("PaymentRefunded", 5)
    )
    wire = totals.to_wire(["a:0"])
    assert wire["held"] == "70" and wire["refundable"] == "25"
    assert EscrowTotals.from_wire(wire) == totals


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (S.SETTLING, S.AUTHORIZED),
        (S.SETTLING, S.CAPTURED),
        (S.SETTLING, S.REFUNDED),
        (S.SETTLING, S.VOIDED),
        (S.SETTLING, S.RECLAIMED),
        (S.AUTHORIZED, S.REFUNDED),
        (S.CAPTURED, S.REFUNDED),
    ],
)
def test_every_chain_outcome_is_reachable_by_legal_edges(start: S, target: S) -> None:
    path = _path(start, target)
    assert path[-1] == target
    for a, b in zip([start, *path], path, strict=False):
        assert can_transition(a, b), (a, b)


@pytest.mark.parametrize(
    ("events", "kept"),
    [
        ((ev("PaymentAuthorized", 100),), 100),  # held: may still be captured
        ((ev("PaymentCharged", 100),), 100),
        ((ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30)), 100),
        ((ev("PaymentAuthorized", 100), ev("PaymentCaptured", 30), ev("PaymentVoided", 70)), 30),
        ((ev("PaymentAuthorized", 100), ev("PaymentReclaimed", 100)), 0),
        # a refund is the seller's money coming back, as for exact: the budget keeps it spent
        ((ev("PaymentCharged", 100), ev("PaymentRefunded", 40)), 100),
    ],
)
def test_what_an_escrow_payment_costs_the_budget(
    events: tuple[EscrowEvent, ...], kept: int
) -> None:
    assert budget_kept(replay(*events)) == kept
