"""The connector definition a workflow builder renders (``GET /v1/manifest``).

Generated from the same Pydantic models that validate action input and the event catalogue, so
it cannot drift from what the code accepts and emits.
"""

from __future__ import annotations

from typing import Any

from connector import __version__
from connector.actions.outcome import JOB_STATUSES, TERMINAL
from connector.actions.registry import ACTIONS, JOB_MODELS
from connector.connections.schemas import ConnectionCreate
from connector.events.catalogue import API_VERSION, EVENT_TYPES
from connector.jobs import NATURAL_KEY_HEADERS

SECRET_FIELDS = ("api_key", "webhook_secret", "private_key")

SAMPLE_PAYMENT: dict[str, Any] = {
    "id": "pay_01jdsample00000000000000000",
    "object": "payment",
    "connection_id": "conn_01jdsample0000000000000000",
    "direction": "outgoing",
    "state": "settled",
    "amount": "10000",
    "refunded_amount": "0",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "network": "eip155:84532",
    "payer": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "payee": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "tx_hash": "0x" + "ab" * 32,
    "failure_code": None,
    "failure_reason": None,
    "created_at": "2026-11-23T00:00:00+00:00",
    "updated_at": "2026-11-23T00:00:01+00:00",
}


def _sample_output(key: str) -> dict[str, Any]:
    if key == "send":
        return {
            "payment": SAMPLE_PAYMENT,
            "response": {
                "status": 200,
                "headers": {"content-type": "application/json"},
                "body": '{"report": "..."}',
                "body_encoding": "utf-8",
                "truncated": False,
            },
        }
    if key == "receive":
        return {
            "payment_request": {
                "id": "prq_01jdsample00000000000000000",
                "object": "payment_request",
                "url": "https://x402.example.com/pay/prq_01jdsample00000000000000000",
                "amount": "50000",
                "asset": SAMPLE_PAYMENT["asset"],
                "network": "eip155:84532",
                "pay_to": SAMPLE_PAYMENT["payee"],
                "capture": "automatic",
                "custodial": False,
                "max_payments": 1,
                "paid_count": 0,
                "status": "open",
                "expires_at": "2026-11-23T01:00:00+00:00",
            }
        }
    if key == "verify":
        return {"valid": True, "reason": None, "payer": SAMPLE_PAYMENT["payer"], "transfers": []}
    if key == "refund":
        return {
            "refund": {
                "id": "ref_01jdsample00000000000000000",
                "payment_id": SAMPLE_PAYMENT["id"],
                "amount": "5000",
                "state": "succeeded",
                "tx_hash": "0x" + "cd" * 32,
                "failure_reason": None,
            },
            "payment": {**SAMPLE_PAYMENT, "state": "partially_refunded", "refunded_amount": "5000"},
        }
    if key == "balance":
        return {
            "address": SAMPLE_PAYMENT["payer"],
            "network": "eip155:84532",
            "asset": SAMPLE_PAYMENT["asset"],
            "balance": "1000000",
            "history": [SAMPLE_PAYMENT],
        }
    return {"payment": SAMPLE_PAYMENT}


#: How a workflow builder reads a job (the same text as docs/workflow-builder.md, in short).
JOB_CONTRACT: dict[str, Any] = {
    "statuses": list(JOB_STATUSES),
    "final": sorted(TERMINAL),
    "meaning": {
        "succeeded": "The action did what was asked; `result` is its output.",
        "failed": "It did not. `error` is a problem object: `code`, `rule` (which policy rule "
        "refused), `retryable` (the same call may succeed later unchanged).",
        "requires_approval": "The payment waits for admins; the job resolves by itself.",
        "pending": "The money's fate is not known yet (not failed); the job resolves by itself.",
        "queued": "Not started yet.",
        "running": "In progress.",
    },
    "http": "200 when the job is final, 202 otherwise (poll GET /v1/jobs/{id}).",
}


def _idempotency(moves_money: bool) -> dict[str, Any]:
    """How a call is made safe to retry; required when the action moves money (428 without)."""
    return {
        "required": moves_money,
        "header": "Idempotency-Key",
        "natural_key_headers": list(NATURAL_KEY_HEADERS),
        "natural_key": "X-Workflow-Run-Id + X-Workflow-Node-Id (+ X-Workflow-Item for a node "
        "that runs once per list item), used when no Idempotency-Key is sent",
    }


def build_manifest(base_url: str) -> dict[str, Any]:
    credentials = ConnectionCreate.model_json_schema()
    props = credentials.get("properties", {})
    for name in SECRET_FIELDS:
        if name in props:
            props[name]["writeOnly"] = True
            props[name]["x-secret"] = True
    return {
        "name": "x402",
        "key": "x402-connector",
        "version": __version__,
        "api_version": API_VERSION,
        "description": "Pay and get paid over x402 (HTTP 402, stablecoins, EIP-3009).",
        "icon": f"{base_url}/static/x402.svg",
        "auth": {"type": "bearer", "scope": "actions", "header": "Authorization"},
        "credentials": {
            "schema": credentials,
            "secret_fields": list(SECRET_FIELDS),
            "help": "Create the connection once per customer; secrets are write-only.",
        },
        "actions": [
            {
                "key": a.key,
                "title": a.title,
                "description": a.description,
                "moves_money": a.moves_money,
                "endpoint": f"{base_url}/v1/connections/{{connection_id}}/actions/{a.key}",
                "modes": ["async", "sync"],
                "idempotency": _idempotency(a.moves_money),
                "input_schema": a.input_model.model_json_schema(),
                "output_schema": a.output_model.model_json_schema(by_alias=True),
                "job_schema": JOB_MODELS[a.key].model_json_schema(by_alias=True),
                "sample_output": _sample_output(a.key),
            }
            for a in ACTIONS
        ],
        "job_contract": JOB_CONTRACT,
        "triggers": [
            {
                "key": event_type,
                "description": description,
                "sample": {
                    "id": "evt_01jdsample00000000000000000",
                    "type": event_type,
                    "api_version": API_VERSION,
                    "created_at": "2026-11-23T00:00:01Z",
                    "connection_id": SAMPLE_PAYMENT["connection_id"],
                    "sequence": 1,
                    "data": {"payment": SAMPLE_PAYMENT},
                },
            }
            for event_type, description in EVENT_TYPES.items()
        ],
        "subscribe": {"method": "POST", "url": f"{base_url}/v1/hooks"},
        "unsubscribe": {"method": "DELETE", "url": f"{base_url}/v1/hooks/{{subscription_id}}"},
    }
