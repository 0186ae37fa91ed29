"""Prometheus metrics (exposed at ``/metrics`` by the API)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PAYMENT_TRANSITIONS = Counter(
    "x402c_payment_transitions_total", "Payment state changes", ["state", "direction"]
)
ACTION_SECONDS = Histogram(
    "x402c_action_seconds", "Action job run time", ["action", "status"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
WEBHOOK_ATTEMPTS = Counter("x402c_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
QUEUE_DEPTH = Gauge("x402c_queue_depth", "Tasks waiting in the broker queue", ["queue"])
PAYMENTS_BY_STATE = Gauge("x402c_payments", "Payments by state (sampled at scrape)", ["state"])
FACILITATOR_GAS_WEI = Gauge(
    "x402c_facilitator_gas_wei", "Facilitator signer's native balance (wei)", ["network"]
)
FACILITATOR_GAS_LOW = Counter(
    "x402c_facilitator_gas_low_total", "Gas checks that found the signer below threshold",
    ["network"],
)  # fmt: skip
FACILITATOR_SETTLEMENTS = Counter(
    "x402c_facilitator_settlements_total", "Facilitator settle outcomes", ["network", "outcome"]
)
ESCROW_MISMATCHES = Counter(
    "x402c_escrow_mismatches_total",
    "Reconcile found an escrow payment's records disagreeing with the escrow's paymentState "
    "(events: the chain's events replayed; ledger: our stored totals)",
    ["kind"],
)
