"""The list of actions the connector offers, with their schemas and human text.

The manifest, the action endpoint's validation and the docs' action reference all read this one
list, so an action cannot exist in one and be missing in another.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from connector.actions import schemas as s


@dataclass(frozen=True)
class ActionSpec:
    key: str
    title: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    moves_money: bool


ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec(
        "send",
        "Send a payment",
        "Pay an x402-protected URL (any method, v1 or v2) and return its response, or pay an "
        "address directly. Policy decides; a retry never pays twice.",
        s.SendInput,
        s.SendOutput,
        True,
    ),
    ActionSpec(
        "receive",
        "Receive a payment",
        "Offer a paid resource at a paywall URL that any x402 client can pay. Automatic capture "
        "settles at once; manual capture holds the payment until release or void.",
        s.ReceiveInput,
        s.ReceiveOutput,
        False,
    ),
    ActionSpec(
        "verify",
        "Verify a payment",
        "Check an x402 payment payload against requirements (nothing settles), or look a "
        "transaction up on-chain (token transfers and confirmations).",
        s.VerifyInput,
        s.VerifyOutput,
        False,
    ),
    ActionSpec(
        "refund",
        "Refund a payment",
        "Return all or part of a settled incoming payment to the payer. Several partial refunds "
        "are allowed; their sum never exceeds what settled.",
        s.RefundInput,
        s.RefundOutput,
        True,
    ),
    ActionSpec(
        "release",
        "Release a held payment",
        "Capture a manual-capture hold (settle it), or for custodial escrow forward the funds to "
        "the beneficiary.",
        s.PaymentRef,
        s.PaymentOutput,
        True,
    ),
    ActionSpec(
        "void",
        "Void a held payment",
        "Drop a manual-capture hold. Nothing moves on-chain.",
        s.PaymentRef,
        s.PaymentOutput,
        False,
    ),
    ActionSpec(
        "balance",
        "Balance and history",
        "Token balance of the connection's wallet on-chain, with recent payments from our records.",
        s.BalanceInput,
        s.BalanceOutput,
        False,
    ),
)

BY_KEY: dict[str, ActionSpec] = {a.key: a for a in ACTIONS}
