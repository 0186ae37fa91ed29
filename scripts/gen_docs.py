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
        "Call an action with `POST /v1/connections/{connection_id}/actions/{key}` and an",
        "`Idempotency-Key` header; add `?wait=N` to wait up to N seconds for the result (200),",
        "otherwise you get `202` and a job to poll at `GET /v1/jobs/{id}`.",
        'Amounts are decimal strings of atomic units (1 USDC = `"1000000"`).',
        "",
    ]
    for action in manifest["actions"]:
        out += [f"## `{action['key']}` — {action['title']}", "", action["description"], ""]
        if action["moves_money"]:
            out += ["Moves money: subject to the connection's spending policy.", ""]
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
        "| type | when |",
        "|---|---|",
    ]
    out += [f"| `{name}` | {text} |" for name, text in EVENT_TYPES.items()]
    return "\n".join(out) + "\n"


PAGES = {"docs/actions.md": actions_page, "docs/events.md": events_page}

if __name__ == "__main__":
    for path, build in PAGES.items():
        (ROOT / path).write_text(build())
        print("wrote", path)
