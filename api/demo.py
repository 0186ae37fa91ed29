"""The newcomer's demo: two agents pay each other on a local chain, end to end.

Every step goes through the public API (admin key, action endpoint with Idempotency-Key, paywall
URL), money moves on anvil through the local facilitator, and webhooks arrive signed at a local
receiver that verifies them with the ``standardwebhooks`` package. The demo checks each step's
effect (payment states, on-chain balances) and exits non-zero if anything did not happen.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from rich.console import Console
from rich.table import Table
from standardwebhooks.webhooks import Webhook

from api.stack import ServerThread, Stack, free_port, start_stack
from connector.chain import ChainClient

DUSD = 10**6  # atomic units per dUSD


class DemoFailed(Exception):
    pass


@dataclass
class Receiver:
    secrets: dict[str, str] = field(default_factory=dict)  # connection id -> whsec
    events: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks/{who}")
        async def hook(who: str, request: Request) -> Response:
            body = await request.body()
            secret = self.secrets.get(who)
            try:
                if secret is None:
                    raise ValueError("unknown receiver")
                event = Webhook(secret).verify(body, dict(request.headers))
            except Exception:
                with self.lock:
                    self.rejected += 1
                return Response(status_code=400)
            with self.lock:
                self.events.append({**event, "_receiver": who})
            return Response(status_code=204)

        return app


class Demo:
    def __init__(self, stack: Stack, console: Console) -> None:
        self.stack = stack
        self.console = console
        self.http = httpx.Client(
            base_url=stack.api_url,
            headers={"authorization": f"Bearer {stack.admin_key}"},
            timeout=60,
        )
        self.chain = ChainClient(stack.chain.rpc_url)
        self.last_error: dict[str, Any] | None = None

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan]▸[/] {text}")

    def ok(self, text: str) -> None:
        self.console.print(f"  [green]✓[/] {text}")

    def expect(self, condition: bool, text: str) -> None:
        if not condition:
            raise DemoFailed(text)
        self.ok(text)

    def call(
        self,
        conn: str,
        action: str,
        body: dict[str, Any],
        wait: int = 30,
        status: str = "succeeded",
    ) -> dict[str, Any]:
        """Run an action; its result. ``status`` is the job status the step expects (a refusal is
        ``failed`` with the rule in ``error``, a payment the payee holds is ``pending``)."""
        response = self.http.post(
            f"/v1/connections/{conn}/actions/{action}",
            params={"wait": wait},
            json=body,
            headers={"idempotency-key": str(uuid.uuid4())},
        )
        if response.status_code not in (200, 202):
            raise DemoFailed(f"{action} answered {response.status_code}: {response.text[:300]}")
        job = response.json()
        if job["status"] != status:
            raise DemoFailed(f"{action} job {job['status']}: {job.get('error')}")
        self.last_error = job.get("error")
        result: dict[str, Any] = job["result"]
        return result

    def balance(self, address: str) -> int:
        return self.chain.token_balance(self.stack.chain.token, address)


def fmt(atomic: int) -> str:
    """Integer arithmetic only: money is never a float, not even for display."""
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), DUSD)
    return f"{sign}{whole:,}.{frac:06d} dUSD"


def run_demo(data_dir: Path | None = None, console: Console | None = None) -> int:
    console = console or Console()
    with ExitStack() as cleanup:
        if data_dir is None:
            # A throwaway directory (it holds a master key): removed when the demo ends.
            data_dir = Path(
                cleanup.enter_context(tempfile.TemporaryDirectory(prefix="x402c-demo-"))
            )
        console.rule("[bold]x402-connector demo")
        console.print(f"data dir: {data_dir}")
        receiver = Receiver()
        hook_server = ServerThread(receiver.app(), free_port()).start()
        cleanup.callback(hook_server.stop)
        with console.status("starting dev chain, facilitator, API and worker…"):
            stack = start_stack(data_dir)
        cleanup.callback(stack.close)
        demo = Demo(stack, console)
        try:
            return _scenario(demo, receiver, hook_server.url)
        except DemoFailed as exc:
            console.print(f"[bold red]✗ demo failed:[/] {exc}")
            return 1
    return 1  # pragma: no cover - only reached if the cleanup swallowed an exception


def _scenario(d: Demo, receiver: Receiver, hooks_url: str) -> int:
    s = d.stack
    buyer_key, seller_key = s.accounts[1], s.accounts[2]
    d.step(f"API on {s.api_url} · anvil on {s.chain.rpc_url} · token dUSD {s.chain.token}")

    def connection(name: str, key: Any, who: str, policy: dict[str, Any]) -> str:
        response = d.http.post(
            "/v1/admin/connections",
            json={
                "name": name,
                "network": s.chain.network,
                "rpc_url": s.chain.rpc_url,
                "facilitator_url": s.facilitator_url,
                "asset": s.chain.token,
                "api_key": "local-facilitator-key-" + who,
                "webhook_url": f"{hooks_url}/hooks/{who}",
                "private_key": "0x" + key.key.hex(),
                "policy": policy,
            },
        )
        if response.status_code != 201:
            raise DemoFailed(f"create connection: {response.status_code} {response.text[:300]}")
        body = response.json()
        receiver.secrets[who] = body["webhook_secret_once"]
        return str(body["id"])

    d.step("Creating two connections (secrets are write-only; only hints come back)")
    buyer = connection(
        "Buyer agent",
        buyer_key,
        "buyer",
        {"max_per_payment": str(5 * DUSD), "budget_day": str(3 * DUSD)},
    )
    seller = connection("Seller agent", seller_key, "seller", {})
    d.ok(f"buyer {buyer} wallet {buyer_key.address}")
    d.ok(f"seller {seller} wallet {seller_key.address}")
    before = {"buyer": d.balance(buyer_key.address), "seller": d.balance(seller_key.address)}

    d.step("Seller offers a paid resource (0.05 dUSD, automatic capture)")
    offer = d.call(
        seller,
        "receive",
        {"amount": str(50_000), "description": "Weather report", "resource": {"forecast": "sunny"}},
    )["payment_request"]
    d.ok(f"paywall {offer['url']}")

    d.step("Buyer's send action pays the paywall (402 → sign → settle → resource)")
    paid = d.call(buyer, "send", {"url": offer["url"]})
    payment = paid["payment"]
    d.expect(
        payment["state"] == "settled", f"payment {payment['id']} settled, tx {payment['tx_hash']}"
    )
    d.expect('"sunny"' in (paid["response"]["body"] or ""), "resource delivered to the buyer")

    d.step("Seller offers a held resource (manual capture: on-chain escrow), buyer pays")
    held_offer = d.call(
        seller, "receive", {"amount": str(200_000), "capture": "manual", "resource": {"ok": 1}}
    )["payment_request"]
    d.expect(
        held_offer["scheme"] == "authCapture",
        f"offered as authCapture, operator {held_offer['escrow_terms']['operator']}",
    )
    held_send = d.call(buyer, "send", {"url": held_offer["url"]})
    d.expect(
        held_send["response"]["status"] == 200,
        "buyer got the resource; its money now sits in the escrow contract",
    )
    incoming = d.http.get(
        "/v1/admin/payments", params={"connection_id": seller, "state": "authorized"}
    ).json()["data"]
    d.expect(
        len(incoming) == 1 and incoming[0]["escrow"]["held"] == "200000",
        f"escrow holds payment {incoming[0]['id'] if incoming else '-'} (0.2 dUSD)",
    )
    captured = d.call(
        seller, "release", {"payment_id": incoming[0]["id"], "amount": str(150_000)}
    )["payment"]
    d.expect(
        captured["state"] == "captured" and captured["captured_amount"] == "150000",
        "seller captured 0.15 dUSD of the hold",
    )
    rest = d.call(seller, "void", {"payment_id": incoming[0]["id"]})["payment"]
    d.expect(rest["escrow"]["voided"] == "50000", "the rest (0.05 dUSD) went back to the buyer")

    d.step("Seller refunds part of the first payment (0.02 dUSD)")
    first_incoming = d.http.get(
        "/v1/admin/payments", params={"connection_id": seller, "state": "settled"}
    ).json()["data"]
    target = next(p for p in first_incoming if p["amount"] == "50000")
    refund = d.call(seller, "refund", {"payment_id": target["id"], "amount": "20000"})
    d.expect(
        refund["payment"]["state"] == "partially_refunded"
        and refund["refund"]["state"] == "succeeded",
        f"refund {refund['refund']['id']} settled, tx {refund['refund']['tx_hash']}",
    )

    d.step("Budget refusal: buyer tries to pay 4 dUSD with a 3 dUSD daily budget")
    refused = d.call(
        buyer, "send", {"to": seller_key.address, "amount": str(4 * DUSD)}, status="failed"
    )
    rule = (d.last_error or {}).get("rule")
    d.expect(
        refused["payment"]["state"] == "rejected" and rule == refused["payment"]["failure_code"],
        f"job failed, payment rejected by rule {rule}",
    )

    d.step("Dry run: the whole decision, nothing signed")
    dry = d.call(buyer, "send", {"to": seller_key.address, "amount": "1000", "dry_run": True})
    d.expect(dry["payment"]["state"] == "simulated", "recorded as simulated")

    d.step("Waiting for webhooks")
    deadline = time.monotonic() + 20
    wanted = {
        "payment.settled",
        "payment.captured",
        "payment.rejected",
        "payment.simulated",
        "payment.partially_refunded",
    }
    while time.monotonic() < deadline:
        with receiver.lock:
            seen = {e["type"] for e in receiver.events}
        if wanted <= seen:
            break
        time.sleep(0.1)
    with receiver.lock:
        counts = Counter((e["_receiver"], e["type"]) for e in receiver.events)
        rejected = receiver.rejected
    table = Table(title="Webhooks received (signatures verified with standardwebhooks)")
    table.add_column("receiver")
    table.add_column("event type")
    table.add_column("count", justify="right")
    for (who, kind), count in sorted(counts.items()):
        table.add_row(who, kind, str(count))
    d.console.print(table)
    d.expect(wanted <= {k for _, k in counts}, "every expected event type arrived, signed")
    d.expect(rejected == 0, "no delivery failed signature verification")

    after = {"buyer": d.balance(buyer_key.address), "seller": d.balance(seller_key.address)}
    balances = Table(title="On-chain balances (dUSD)")
    for column in ("agent", "before", "after", "change"):
        balances.add_column(column, justify="right" if column != "agent" else "left")
    for who in ("buyer", "seller"):
        balances.add_row(who, fmt(before[who]), fmt(after[who]), fmt(after[who] - before[who]))
    d.console.print(balances)
    moved = 50_000 + 150_000 - 20_000
    d.expect(after["buyer"] == before["buyer"] - moved, f"buyer paid exactly {fmt(moved)}")
    d.expect(after["seller"] == before["seller"] + moved, f"seller received exactly {fmt(moved)}")
    d.console.rule("[bold green]demo complete")
    return 0
