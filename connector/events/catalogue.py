"""Every event type the connector emits, with a description for the docs and the manifest.

Payload shape (version ``2026-11-01``)::

    {"id": "evt_…", "type": "payment.settled", "api_version": "2026-11-01",
     "created_at": "…Z", "connection_id": "conn_…", "data": {"payment": {…snapshot…}}}
"""

from __future__ import annotations

API_VERSION = "2026-11-01"

EVENT_TYPES: dict[str, str] = {
    "payment.created": "A payment was created (outgoing send or incoming paywall payment).",
    "payment.requires_approval": "A payment above the approval threshold waits for admins.",
    "payment.authorized": (
        "A valid signed authorization exists; for manual capture, a hold. On-chain escrow "
        "(authCapture): the funds are held by the escrow contract."
    ),
    "payment.settling": (
        "The authorization was handed over for settlement. Also sent when a chain "
        "reorganization removed a settlement (data.vanished_tx_hash): it is settled again."
    ),
    "payment.settled": "Money moved on-chain; data.payment.tx_hash is set.",
    "payment.failed": "The payment definitely did not settle; failure_code says why.",
    "payment.rejected": "Policy or an approver refused the payment; failure_code names the rule.",
    "payment.voided": (
        "A hold was dropped; nothing moved (on-chain escrow: what was still held went back to "
        "the payer)."
    ),
    "payment.expired": "A hold or authorization passed its deadline unused.",
    "payment.hold_expiring": "A hold expires soon (data.expires_at); release or void it.",
    "payment.released": "Custodial escrow paid the beneficiary (release_tx_hash).",
    "payment.refunding": "A refund transfer is in flight.",
    "payment.refunded": "Everything settled was returned to the payer.",
    "payment.partially_refunded": "Part of the settled amount was returned to the payer.",
    "payment.simulated": "Dry-run: the decision ran and nothing was signed.",
    "payment.captured": (
        "On-chain escrow: held funds (or a charge) went to the receiver; sent for every capture, "
        "with data.escrow_operation."
    ),
    "payment.reclaimed": (
        "On-chain escrow: the payer took back what was still held after the capture deadline."
    ),
    "payment.settled_late": (
        "A failed payment turned out paid on-chain; it is settled now (on-chain escrow: the "
        "escrow shows it funded; it is authorized or captured now)."
    ),
    "connection.test_succeeded": "A connection test passed every check.",
    "connection.test_failed": "A connection test failed at least one check.",
    "budget.threshold_reached": "Spending crossed the alert ratio of a budget window.",
    "webhook.endpoint_disabled": "A webhook endpoint was disabled (410 Gone or failing too long).",
    "webhook.test": "A test event sent on request.",
}
