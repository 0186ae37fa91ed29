"""The list of actions the connector offers, with their schemas and human text.

The manifest, the action endpoint's validation and the docs' action reference all read this one
list, so an action cannot exist in one and be missing in another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

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
        "are allowed; their sum never exceeds what settled. On-chain escrow (authCapture): the "
        "escrow's refund of captured money, until the refund deadline.",
        s.RefundInput,
        s.RefundOutput,
        True,
    ),
    ActionSpec(
        "release",
        "Release a held payment",
        "Capture a manual-capture hold (settle it), or for custodial escrow forward the funds to "
        "the beneficiary. On-chain escrow (authCapture): capture all or part of what the escrow "
        "holds (several captures allowed), with a fee within the signed bounds.",
        s.ReleaseInput,
        s.PaymentOutput,
        True,
    ),
    ActionSpec(
        "void",
        "Void a held payment",
        "Drop a manual-capture hold; nothing moves on-chain. On-chain escrow (authCapture): "
        "everything the escrow still holds goes back to the payer (also after a partial "
        "capture).",
        s.PaymentRef,
        s.PaymentOutput,
        False,  # a void never moves money anywhere but back to the payer, and only once
    ),
    ActionSpec(
        "reclaim",
        "Reclaim an escrowed payment",
        "Payer side of on-chain escrow (authCapture): after the capture deadline, take back "
        "with the connection's own wallet key whatever the escrow still holds for an outgoing "
        "payment. No seller, operator or facilitator involved; the wallet pays the gas. The "
        "reclaimed amount goes back to the budget.",
        s.PaymentRef,
        s.PaymentOutput,
        True,
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


def _job_model(spec: ActionSpec) -> type[BaseModel]:
    """The job shape of one action: ``action`` is the discriminator, ``result`` its output."""
    name = "".join(part.capitalize() for part in spec.key.split("_")) + "Job"
    fields: dict[str, Any] = {
        "action": (Literal[spec.key], Field(description="The action this job runs.")),
        "result": (
            spec.output_model | None,
            Field(
                default=None,
                description="The action's output. Also set while `requires_approval` or "
                "`pending` (the payment so far), and with `failed` when a payment was recorded.",
            ),
        ),
    }
    model: type[BaseModel] = create_model(name, __base__=s.JobBase, **fields)
    model.__doc__ = f"A `{spec.key}` job. {s.JobBase.__doc__}"
    return model


#: One job model per action, for the API's typed responses (discriminated by ``action``).
JOB_MODELS: dict[str, type[BaseModel]] = {a.key: _job_model(a) for a in ACTIONS}

#: Any job: the per-action job shapes, told apart by ``action`` (an OpenAPI discriminator).
AnyJob = Annotated[Union[tuple(JOB_MODELS.values())], Field(discriminator="action")]  # type: ignore[valid-type]  # noqa: UP007
