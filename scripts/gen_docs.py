"""Regenerate the docs pages that come from code (action and event reference).

Run `.venv/bin/python scripts/gen_docs.py`; tests fail when the committed pages are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connector.actions.manifest import build_manifest  # noqa: E402
from connector.events.catalogue import API_VERSION, EVENT_TYPES  # noqa: E402


def _fields(schema: dict) -> list[str]:  # type: ignore[type-arg]
    rows = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or " or ".join(
            str(p.get("type", p.get("$ref", "object")).split("/")[-1])
            for p in prop.get("anyOf", [])
        )
        text = (prop.get("description") or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {'yes' if name in required else ''} | {text} |")
    return rows


def actions_page() -> str:
    manifest = build_manifest("https://x402.example.com")
    out = [
        "# Action reference",
        "",
        "Generated from the same Pydantic models that validate input (`scripts/gen_docs.py`).",
        "Call an action with `POST /v1/connections/{connection_id}/actions/{key}`; add",
        "`?wait=N` to wait up to N seconds for a final result (`200`), otherwise you get `202`",
        "and a job to poll at `GET /v1/jobs/{id}`. The job's `status` is the action's real",
        "outcome: `succeeded`, `failed` (with `error.code`, `error.rule`, `error.retryable`),",
        "or, not final yet, `requires_approval` / `pending` (see",
        "[workflow-builder.md](workflow-builder.md#the-job-contract)).",
        "Actions that move money need an idempotency key: the `Idempotency-Key` header or the",
        "node's natural key (`X-Workflow-Run-Id` + `X-Workflow-Node-Id`); without one: `428`.",
        'Amounts are decimal strings of atomic units (1 USDC = `"1000000"`).',
        "",
    ]
    for action in manifest["actions"]:
        out += [f"## `{action['key']}` — {action['title']}", "", action["description"], ""]
        if action["moves_money"]:
            out += [
                "Moves money: subject to the connection's spending policy; an idempotency key "
                "is required.",
                "",
            ]
        out += ["| input | type | required | meaning |", "|---|---|---|---|"]
        out += _fields(action["input_schema"])
        out += [
            "",
            "Sample result:",
            "",
            "```json",
            json.dumps(action["sample_output"], indent=2),
            "```",
            "",
        ]
    return "\n".join(out)


def events_page() -> str:
    out = [
        "# Event reference",
        "",
        f"Payload version `{API_VERSION}`. Every event is delivered as a signed webhook (see",
        "[webhooks.md](webhooks.md)) with this envelope; `id` is stable across retries and",
        "redeliveries, so receivers de-duplicate by it.",
        "",
        "```json",
        json.dumps(
            {
                "id": "evt_…",
                "type": "payment.settled",
                "api_version": API_VERSION,
                "created_at": "2026-11-23T00:00:01Z",
                "connection_id": "conn_…",
                "sequence": 4,
                "data": {
                    "payment": {"id": "pay_…", "state": "settled", "amount": "10000", "…": "…"}
                },
            },
            indent=2,
        ),
        "```",
        "",
        "`data.payment` is the payment's snapshot at the time of the event (the same object the",
        "admin API returns). Payment events follow the [state machine](state-machine.md).",
        "",
        "`sequence` numbers a payment's events 1, 2, 3… in the order they happened (`null` for",
        "events about no payment). Each subscriber receives a payment's events in this order: an",
        "event is sent only after every earlier one was delivered (or gave up, `failed`/`dead`),",
        "so `sequence` orders and, with `id`, de-duplicates a payment's history.",
        "",
        "| type | when |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {text} |" for name, text in EVENT_TYPES.items()]
    return "\n".join(out) + "\n"


def networks_page() -> str:
    from connector.x402.networks import NETWORKS

    out = [
        "# Networks",
        "",
        "The network registry (`connector/x402/networks.py`, this table is generated from it by",
        "`scripts/gen_docs.py`) lists the EVM networks x402 users pay on: the CAIP-2 id the",
        "connector stores, the v1 name the v1 wire uses (a chain without one keeps its CAIP-2 id",
        "there), the chain id, the canonical USDC contract and its EIP-712 domain, the block time",
        "and the default number of confirmations. Every fact carries its source in a comment in",
        "the module; the unit test `tests/unit/test_networks.py` checks them against the official",
        "Python SDK's own tables.",
        "",
        "A connection needs only `network` (CAIP-2 or v1 name) and an `rpc_url` (plus its",
        "`facilitator_url`) to pay and receive USDC: the token, its EIP-712 domain and the v1",
        "name all come from here. Where no official SDK states the USDC domain (marked *read*),",
        "the connector reads `name()` and `version()` from the token the first time it needs",
        "them instead of guessing. Any other `eip155:<chain id>` works too, with `asset` set on",
        "the connection or the action.",
        "",
        "Confirmations are our policy, not a fact: 1 on rollups with a sequencer and on",
        "fast-finality chains, 2 on Ethereum, 5 on Polygon PoS, 1 on test networks. A",
        "facilitator operator overrides them per network (`confirmations` in its config), and",
        "so does a connector operator for the on-chain escrow events the connector applies",
        "(`X402C_NETWORK_CONFIRMATIONS`, see [escrow.md](escrow.md#confirmations)).",
        "",
        "| network | CAIP-2 | v1 name | chain id | USDC | EIP-712 domain | block time "
        "| confirmations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for net in sorted(NETWORKS.values(), key=lambda n: (n.testnet, n.title)):
        usdc = net.usdc
        token = f"`{usdc.address}`" if usdc else "—"
        if usdc is None:
            domain = "—"
        elif usdc.name is None:
            domain = "*read from the token*"
        else:
            domain = f"{usdc.name!r} / {usdc.version!r}"
        out.append(
            f"| {net.title}{' (testnet)' if net.testnet else ''} | `{net.caip2}` | "
            f"{('`' + net.v1_name + '`') if net.v1_name else '—'} | {net.chain_id} | {token} | "
            f"{domain} | {net.block_time_s:g} s | {net.confirmations} |"
        )
    out += [
        "",
        "## Adding a network",
        "",
        "1. Find the facts in an official source: the chain id; the v1 name only if the x402",
        "   SDKs define one (never invent v1 names: v1 peers would not recognize them); the",
        "   USDC (or other EIP-3009 token) address from the issuer; its EIP-712 domain as the",
        "   SDKs state it or as the deployed contract returns it (`name()`, `version()`).",
        "2. Add a `Network(...)` line in `connector/x402/networks.py` with a comment naming",
        "   each source. Leave the domain `None` rather than guess it.",
        "3. Run `.venv/bin/python scripts/gen_docs.py` (this page) and",
        "   `.venv/bin/pytest tests/unit/test_networks.py`.",
        "4. To serve it from `x402c facilitator`, add it to the facilitator's config",
        "   (see `docs/facilitator.md`).",
        "",
        "To try a network offline, run anvil with its chain id and put the dev token at the",
        "canonical address: `connector.devchain.deploy.setup_token_at(client, address,",
        "name=..., version=...)` deploys DevUSD with that EIP-712 domain and copies its code",
        "and storage there with `anvil_setCode` / `anvil_setStorageAt`",
        "(`tests/e2e/test_named_network.py` does this for Base Sepolia).",
        "",
    ]
    return "\n".join(out)


PAGES = {
    "docs/actions.md": actions_page,
    "docs/events.md": events_page,
    "docs/networks.md": networks_page,
}

if __name__ == "__main__":
    for path, build in PAGES.items():
        (ROOT / path).write_text(build())
        print("wrote", path)
