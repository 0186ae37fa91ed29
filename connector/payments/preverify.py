"""The paywall's check of an ``exact`` payment before it claims a slot (decision 0012).

With **automatic capture** the facilitator's ``/settle`` verifies the payment again before it
sends anything, so asking ``/verify`` first only repeats that work one HTTP round trip earlier.
The paywall instead verifies the payment itself, completely, and goes straight to the claim:

* everything that needs no chain: scheme, network, payee, amount, ``validAfter``/``validBefore``
  (with the facilitator's settlement margin), the token's EIP-712 domain and the signature
  (:func:`connector.x402.exact_evm.verify_exact_offline`, the same code our facilitator runs);
* and the chain, read directly through the connection's RPC in one batch: the authorization's
  nonce is unused and the payer's balance covers the amount
  (:class:`~connector.chain.reads.PaymentStateReader`).

The chain read is not optional. After a claim, a settle answer that is not a success is decided
from the chain (:func:`connector.payments.onchain.outcome`), where a used nonce counts as paid:
right for our own earlier attempt, wrong for an authorization that had already moved its money
for something else (another seller sharing the payee address, say) before we ever claimed. The
read keeps that window as narrow as it was with ``/verify``. It also keeps hostile input as cheap
to refuse as before: a bad signature costs one local recovery, an unfunded or spent authorization
one RPC batch; neither claims a slot, writes a row or reaches the facilitator.

Whatever the facilitator would refuse and we cannot see (its own network or asset policy, a
simulation) it refuses at ``/settle`` before sending anything: a definite failure that gives the
slot back in the transaction that marks the payment failed, as for any refused settlement.

**Manual capture** keeps ``/verify``: a hold is delivered now and settled later, so the
facilitator must vouch for it now. So does a chain that cannot be read (the facilitator may
still reach its own).
"""

from __future__ import annotations

from typing import Any

from connector.errors import ExternalServiceError
from connector.logs import get_logger
from connector.payments.context import ConnectionContext
from connector.runtime import Runtime
from connector.x402 import exact_evm as exact
from connector.x402.codec import IncomingPayment
from connector.x402.requirement import Requirement

log = get_logger(__name__)


def verify_for_claim(
    rt: Runtime,
    ctx: ConnectionContext,
    incoming: IncomingPayment,
    requirement: Requirement,
    wire_requirement: dict[str, Any],
    *,
    capture: str,
) -> dict[str, Any]:
    """``{isValid, invalidReason?, payer?}`` as a facilitator's ``/verify`` answers it: checked
    here for an automatically captured ``exact`` payment, asked of the facilitator otherwise."""
    if capture == "automatic" and incoming.scheme == "exact" and requirement.scheme == "exact":
        try:
            return exact.verify_exact(
                incoming.payload,
                requirement,
                rt.payment_state_reader(ctx.rpc_url),
                scheme=incoming.scheme,
                network=incoming.network,
            ).to_wire()
        except ExternalServiceError as exc:
            log.warning(
                "chain unreadable for the paywall's check; asking the facilitator",
                extra={"connection_id": ctx.id, "reason": exc.detail[:200]},
            )
    facilitator = rt.facilitator(ctx.facilitator_url, ctx.api_key())
    return facilitator.verify(incoming.wire, wire_requirement)
