"""The one payment state machine, shared by outgoing (`send`) and incoming (`receive`) payments.

Every edge a payment may take is listed in :data:`TRANSITIONS`; nothing else in the code base
decides whether a move is legal. The table is data, so the docs' diagram is generated from it and
cannot drift.

Meaning of the states that are easy to confuse:

* ``authorized`` — a valid signed EIP-3009 authorization exists (signed by us for ``send``,
  verified from the payer for ``receive``). With manual capture an incoming payment *waits* here:
  that is the escrow hold. Nothing has moved on-chain yet.
* ``settling`` — the authorization was handed to a facilitator (or a resource server). The outcome
  may be unknown (crash, timeout); only reconciliation against the chain may move it on.
* ``settled`` — money moved; the transaction hash is recorded.
* ``released`` — custodial escrow only: the escrow forwarded the funds to the beneficiary.

On-chain escrow (``authCapture``, see docs/escrow.md) uses the same table; there the money is in
the escrow contract, so the meanings shift by one step:

* ``settling`` — the collection (``authorize`` or ``charge``) was handed to the facilitator.
* ``authorized`` — the funds are **held in the escrow contract** (nothing captured yet).
* ``captured`` — some or all of the held amount went to the receiver (``capture``, or ``charge``
  which collects and captures at once); what is still held stays capturable.
* ``voided`` / ``reclaimed`` — nothing was captured and the held funds went back to the payer,
  by the operator (``void``) or by the payer after the capture deadline (``reclaim``).
* ``partially_refunded`` / ``refunded`` — captured money returned through the escrow's
  ``refund``.

Repeated operations that do not change the headline (a second partial capture, voiding the rest
after a capture, a further partial refund) are recorded as events on the same payment; the
amounts live in ``Payment.escrow`` (see :mod:`connector.payments.escrow_ledger`).
"""

from __future__ import annotations

from enum import StrEnum

from connector.errors import IllegalTransition


class PaymentState(StrEnum):
    CREATED = "created"
    REQUIRES_APPROVAL = "requires_approval"
    AUTHORIZED = "authorized"
    SETTLING = "settling"
    SETTLED = "settled"
    REFUNDING = "refunding"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    RELEASED = "released"
    FAILED = "failed"
    REJECTED = "rejected"
    VOIDED = "voided"
    EXPIRED = "expired"
    SIMULATED = "simulated"
    CAPTURED = "captured"
    RECLAIMED = "reclaimed"


S = PaymentState

TRANSITIONS: dict[PaymentState, frozenset[PaymentState]] = {
    # created -> settling: an on-chain escrow collection goes to the facilitator at once; its
    # ``authorized`` (funds held by the contract) comes after, from the chain.
    S.CREATED: frozenset(
        {
            S.REQUIRES_APPROVAL,
            S.AUTHORIZED,
            S.SETTLING,
            S.REJECTED,
            S.SIMULATED,
            S.FAILED,
            S.EXPIRED,
        }
    ),
    S.REQUIRES_APPROVAL: frozenset({S.AUTHORIZED, S.REJECTED, S.EXPIRED, S.FAILED}),
    # authorized -> failed: the authorization was refused before any settlement was attempted
    # (e.g. the resource server rejected it, or a re-check of the budget failed).
    # authorized -> captured / reclaimed: on-chain escrow (capture, the payer's reclaim).
    S.AUTHORIZED: frozenset({S.SETTLING, S.VOIDED, S.EXPIRED, S.FAILED, S.CAPTURED, S.RECLAIMED}),
    # settling -> authorized / captured: an escrow collection mined (authorize holds, charge
    # captures at once).
    S.SETTLING: frozenset({S.SETTLED, S.FAILED, S.AUTHORIZED, S.CAPTURED}),
    # settled -> settling: the settlement's receipt vanished in a chain reorganization before
    # it was final; the same authorization is settled again (see payments/confirmations.py).
    S.SETTLED: frozenset({S.REFUNDING, S.RELEASED, S.SETTLING}),
    # A refund that fails on-chain returns the payment to where it was before the refund began
    # (settled, or partially_refunded for a later partial refund).
    S.REFUNDING: frozenset({S.REFUNDED, S.PARTIALLY_REFUNDED, S.SETTLED}),
    # partially_refunded -> refunded: the escrow's refund returns the rest of what was captured.
    S.PARTIALLY_REFUNDED: frozenset({S.REFUNDING, S.REFUNDED}),
    # captured: on-chain escrow refunds go straight to their result (the escrow's refund is one
    # transaction with no separate in-flight state; an unknown outcome is read back from the
    # escrow's paymentState).
    S.CAPTURED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.RECLAIMED: frozenset(),
    S.RELEASED: frozenset(),
    S.REFUNDED: frozenset(),
    # failed -> settled: a correction, taken only by the reconciler on on-chain evidence (the
    # authorization's nonce is used: a transfer thought failed was mined after all).
    # failed -> authorized / captured: the same correction for an on-chain escrow collection
    # (the escrow's events show it funded after all).
    S.FAILED: frozenset({S.SETTLED, S.AUTHORIZED, S.CAPTURED}),
    S.REJECTED: frozenset(),
    S.VOIDED: frozenset(),
    S.EXPIRED: frozenset(),
    S.SIMULATED: frozenset(),
}

#: Edges that correct a final state from on-chain evidence; no request can take them.
CORRECTIONS: frozenset[tuple[PaymentState, PaymentState]] = frozenset(
    {(S.FAILED, S.SETTLED), (S.FAILED, S.AUTHORIZED), (S.FAILED, S.CAPTURED)}
)

#: Final states: nothing but a correction from the chain (see CORRECTIONS) leaves them.
TERMINAL: frozenset[PaymentState] = frozenset(
    s for s, nxt in TRANSITIONS.items() if all((s, t) in CORRECTIONS for t in nxt)
)

#: States in which money may still move for this payment; reconciliation watches these.
IN_FLIGHT: frozenset[PaymentState] = frozenset({S.SETTLING, S.REFUNDING})

#: The event type emitted on entering each state (ARCHITECTURE.md §5 catalogue).
EVENT_FOR_STATE: dict[PaymentState, str] = {
    S.CREATED: "payment.created",
    S.REQUIRES_APPROVAL: "payment.requires_approval",
    S.AUTHORIZED: "payment.authorized",
    S.SETTLING: "payment.settling",
    S.SETTLED: "payment.settled",
    S.REFUNDING: "payment.refunding",
    S.PARTIALLY_REFUNDED: "payment.partially_refunded",
    S.REFUNDED: "payment.refunded",
    S.RELEASED: "payment.released",
    S.FAILED: "payment.failed",
    S.REJECTED: "payment.rejected",
    S.VOIDED: "payment.voided",
    S.EXPIRED: "payment.expired",
    S.SIMULATED: "payment.simulated",
    S.CAPTURED: "payment.captured",
    S.RECLAIMED: "payment.reclaimed",
}


def can_transition(current: PaymentState | str, target: PaymentState | str) -> bool:
    return PaymentState(target) in TRANSITIONS[PaymentState(current)]


def check_transition(
    payment_id: str, current: PaymentState | str, target: PaymentState | str
) -> None:
    """Raise :class:`IllegalTransition` (HTTP 409) unless ``current -> target`` is an edge."""
    if not can_transition(current, target):
        allowed = sorted(s.value for s in TRANSITIONS[PaymentState(current)])
        raise IllegalTransition(
            f"payment {payment_id} cannot move from {current} to {target}",
            payment_id=payment_id,
            current=str(current),
            target=str(target),
            allowed=allowed,
        )


def mermaid_diagram() -> str:
    """The state diagram as Mermaid text, generated from :data:`TRANSITIONS` for the docs."""
    lines = ["stateDiagram-v2", "    [*] --> created"]
    for state, targets in TRANSITIONS.items():
        for target in sorted(targets, key=lambda s: s.value):
            lines.append(f"    {state.value} --> {target.value}")
    for state in sorted(TERMINAL, key=lambda s: s.value):
        lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines)
