"""Our paywall offers on-chain escrow (``authCapture``) and the connector's actions drive it.

End to end on the embedded stack (anvil with the escrow at its canonical addresses, our local
facilitator as the escrow's operator, the API, the worker): payers are our own ``send`` and the
official TypeScript client; the seller acts only through ``receive``, ``release``, ``void`` and
``refund``; every balance is read back on-chain (payer, receiver, fee receiver, the operator's
token store in the escrow), and the payment's webhooks arrive signed and in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook

from api.stack import Stack
from connector.chain import ChainClient
from connector.chain.auth_capture import EscrowClient
from connector.devchain.deploy import mint
from connector.payments import escrow_operator
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import approve
from tests.fixtures.servers import LiveServer
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]

PAY_HELPER = Path(__file__).parents[1] / "helpers" / "ts_auth_capture_pay.js"
_TS = Path(__file__).parents[2] / ".devtools" / "ts-interop" / "node_modules"
TS_CLIENT = Path(
    os.environ.get(
        "X402C_X402_EVM_CLIENT",
        str(_TS / "@x402" / "evm" / "dist" / "cjs" / "auth-capture" / "client" / "index.js"),
    )
)
TS_NODE_PATH = Path(os.environ.get("X402C_TS_NODE_PATH", str(_TS)))


@dataclass
class Hooks:
    """A webhook endpoint that verifies every delivery's signature and keeps the events."""

    secret: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks")
        async def hook(request: Request) -> Response:
            body = await request.body()
            try:
                event = Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:
                with self.lock:
                    self.rejected += 1
                return Response(status_code=400)
            with self.lock:
                self.events.append(event)
            return Response(status_code=204)

        return app

    def of_payment(self, payment_id: str) -> list[dict[str, Any]]:
        with self.lock:
            mine = [e for e in self.events if e["data"]["payment"]["id"] == payment_id]
        return sorted(mine, key=lambda e: int(e["sequence"]))

    def wait_for(self, payment_id: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.of_payment(payment_id)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return found


@dataclass
class World:
    stack: Stack
    chain: ChainClient
    seller: Agent
    hooks: Hooks
    operator: LocalAccount

    def balance(self, address: str) -> int:
        return self.chain.token_balance(self.stack.chain.token, address)

    @property
    def store(self) -> str:
        """The operator's token store: where the escrow keeps what it holds."""
        return EscrowClient(self.chain).token_store(self.operator.address)

    def payer(self, amount: int) -> Agent:
        """A fresh buyer connection whose wallet holds exactly ``amount``."""
        account: LocalAccount = Account.create()
        mint(self.chain, self.stack.chain.token, self.stack.accounts[0], account.address, amount)
        return make_agent(self.stack, account)

    def fund_operator(self, amount: int) -> None:
        """Refunds are funded by the operator (through the canonical refund collector)."""
        mint(
            self.chain,
            self.stack.chain.token,
            self.stack.accounts[0],
            self.operator.address,
            amount,
        )

    def payment(self, payment_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.seller.http.get(f"/v1/admin/payments/{payment_id}").json()
        return found


@pytest.fixture(scope="module")
def world(stack: Stack) -> Iterator[World]:
    hooks = Hooks()
    chain = ChainClient(stack.chain.rpc_url)
    operator = stack.accounts[19]  # the stack facilitator's gas key: the escrow operator
    approve(chain, stack.chain.token, operator, ac.DEFAULT_DEPLOYMENT.operator_refund_collector,
            2**256 - 1)  # fmt: skip
    with LiveServer(hooks.app()) as server:
        seller = make_agent(stack, stack.accounts[14], webhook_url=server.url + "/hooks")
        hooks.secret = seller.http.post(
            f"/v1/admin/connections/{seller.connection_id}/rotate-webhook-secret"
        ).json()["webhook_secret_once"]
        yield World(stack, chain, seller, hooks, operator)
    chain.close()


def paywall(world: World, amount: int, **terms: Any) -> dict[str, Any]:
    body = {"amount": str(amount), "resource": {"secret": "escrowed"}, **terms}
    request: dict[str, Any] = world.seller.run("receive", body)["payment_request"]
    return request


def paid_id(result: dict[str, Any]) -> str:
    payment_id: str = result["response"]["headers"]["x-x402c-payment-id"]
    return payment_id


def test_hold_capture_twice_refund_part_void_the_rest(world: World) -> None:
    receiver, fees = Account.create().address, Account.create().address
    # capture: manual, no scheme named: on-chain escrow is the default where it is deployed
    request = paywall(
        world, 1_000_000, capture="manual", pay_to=receiver,
        min_fee_bps=100, max_fee_bps=300, fee_receiver=fees,
    )  # fmt: skip
    assert request["scheme"] == "authCapture" and request["protocols"] == "v2", request
    terms = request["escrow_terms"]
    assert terms["operator"] == world.operator.address
    assert (terms["min_fee_bps"], terms["max_fee_bps"], terms["fee_receiver"]) == (100, 300, fees)
    buyer = world.payer(1_000_000)
    store0 = world.balance(world.store)

    sent = buyer.run("send", {"url": request["url"]})
    assert sent["response"]["status"] == 200 and "escrowed" in sent["response"]["body"], sent
    pid = paid_id(sent)
    held = world.payment(pid)
    assert (held["state"], held["scheme"], held["escrow"]["held"]) == (
        "authorized", "authCapture", "1000000"
    )  # fmt: skip
    # the money left the payer and sits in the escrow: not with the receiver
    assert world.balance(buyer.account.address) == 0
    assert world.balance(world.store) == store0 + 1_000_000
    assert world.balance(receiver) == 0

    first = world.seller.run("release", {"payment_id": pid, "amount": "300000", "fee_bps": 200})
    assert first["payment"]["state"] == "captured"
    second = world.seller.run("release", {"payment_id": pid, "amount": "200000"})  # fee: min
    assert second["payment"]["state"] == "captured"
    assert second["payment"]["escrow"]["held"] == "500000"
    assert second["payment"]["captured_amount"] == "500000"
    fee = 300_000 * 200 // 10_000 + 200_000 * 100 // 10_000
    assert (world.balance(receiver), world.balance(fees)) == (500_000 - fee, fee)
    assert world.balance(world.store) == store0 + 500_000

    # a fee outside the signed bounds, or more than is held: refused, nothing moves
    too_high = world.seller.fail("release", {"payment_id": pid, "amount": "1", "fee_bps": 301})
    assert (too_high["status"], too_high["code"]) == (422, "validation_failed")
    too_much = world.seller.fail("release", {"payment_id": pid, "amount": "500001"})
    assert (too_much["status"], too_much["code"]) == (409, "escrow_refused")

    world.fund_operator(150_000)
    operator0 = world.balance(world.operator.address)
    refunded = world.seller.run("refund", {"payment_id": pid, "amount": "150000"})
    assert refunded["refund"]["state"] == "succeeded" and refunded["refund"]["tx_hash"]
    assert refunded["payment"]["state"] == "partially_refunded"
    assert world.balance(buyer.account.address) == 150_000
    assert world.balance(world.operator.address) == operator0 - 150_000
    # never above what was captured and not yet refunded (500000 - 150000)
    over = world.seller.fail("refund", {"payment_id": pid, "amount": "350001"})
    assert over["status"] == 422

    voided = world.seller.job("void", {"payment_id": pid})
    assert voided["status"] == "succeeded", voided
    after = voided["result"]["payment"]
    assert after["state"] == "partially_refunded" and after["escrow"]["held"] == "0"
    assert after["escrow"]["voided"] == "500000"
    assert world.balance(buyer.account.address) == 150_000 + 500_000
    assert world.balance(world.store) == store0
    assert (world.balance(receiver), world.balance(fees)) == (500_000 - fee, fee)
    # nothing is held any more: a further void or capture is refused before anything is sent
    assert world.seller.fail("void", {"payment_id": pid})["code"] == "escrow_refused"
    info = escrow_operator.terms_of(_payment_row(world, pid)).info
    assert EscrowClient(world.chain).state(info) == ac.EscrowState(True, 0, 350_000)

    events = world.hooks.wait_for(pid, 7)
    types = [e["type"] for e in events]
    escrow_types = [t for t in types if t not in ("payment.created", "payment.settling")]
    assert escrow_types == [
        "payment.authorized",
        "payment.captured",
        "payment.captured",
        "payment.partially_refunded",
        "payment.voided",
    ], types
    operations = [e["data"].get("escrow_operation", {}).get("name") for e in events[2:]]
    assert operations == [
        "PaymentAuthorized", "PaymentCaptured", "PaymentCaptured", "PaymentRefunded",
        "PaymentVoided",
    ]  # fmt: skip
    assert world.hooks.rejected == 0


def test_automatic_capture_charges_at_once_with_the_fee_split(world: World) -> None:
    receiver, fees = Account.create().address, Account.create().address
    request = paywall(
        world, 400_000, scheme="authCapture", capture="automatic", pay_to=receiver,
        min_fee_bps=250, max_fee_bps=250, fee_receiver=fees,
    )  # fmt: skip
    buyer = world.payer(400_000)
    store0 = world.balance(world.store)
    sent = buyer.run("send", {"url": request["url"]})
    payment = world.payment(paid_id(sent))
    assert payment["state"] == "captured" and payment["escrow"]["held"] == "0", payment
    fee = 400_000 * 250 // 10_000
    assert (world.balance(receiver), world.balance(fees)) == (400_000 - fee, fee)
    assert world.balance(buyer.account.address) == 0
    assert world.balance(world.store) == store0  # charged: never held
    # a charge holds nothing: there is nothing to capture or void
    assert world.seller.fail("release", {"payment_id": payment["id"]})["code"] == "escrow_refused"
    world.fund_operator(400_000)
    whole = world.seller.run("refund", {"payment_id": payment["id"]})
    assert whole["payment"]["state"] == "refunded" and whole["refund"]["amount"] == "400000"
    assert world.balance(buyer.account.address) == 400_000
    events = [e["type"] for e in world.hooks.wait_for(payment["id"], 4)]
    assert events[-2:] == ["payment.captured", "payment.refunded"], events


def test_refund_after_the_refund_deadline_is_refused_and_moves_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = paywall(world, 50_000, scheme="authCapture", capture="automatic")
    buyer = world.payer(50_000)
    pid = paid_id(buyer.run("send", {"url": request["url"]}))
    assert world.payment(pid)["state"] == "captured"
    deadline = int(request["escrow_terms"]["refund_deadline"])
    world.fund_operator(50_000)
    operator0 = world.balance(world.operator.address)
    # the connector's clock (not the chain's) is past the refund deadline
    monkeypatch.setattr(escrow_operator, "_now", lambda: deadline + 1)
    error = world.seller.fail("refund", {"payment_id": pid, "amount": "10000"})
    assert (error["status"], error["code"]) == (409, "refund_deadline_expired"), error
    assert "refund deadline" in error["detail"]
    assert world.balance(buyer.account.address) == 0
    assert world.balance(world.operator.address) == operator0
    refunds = world.seller.http.get(f"/v1/admin/payments/{pid}").json()
    assert refunds["state"] == "captured" and refunds["refunded_amount"] == "0"


def test_exact_keeps_the_manual_capture_hold(world: World) -> None:
    request = paywall(world, 1_000, capture="manual", scheme="exact")
    assert request["scheme"] == "exact" and request["escrow_terms"] is None
    assert request["protocols"] == "both"


def test_escrow_terms_are_validated_at_the_boundary(world: World) -> None:
    def refused(body: dict[str, Any]) -> dict[str, Any]:
        response = world.seller.call("receive", {"amount": "5", **body})
        assert response.status_code == 422, response.text
        problem: dict[str, Any] = response.json()
        return problem

    assert "exact" in refused({"scheme": "exact", "max_fee_bps": 10})["detail"]
    assert "fee_receiver" in refused({"max_fee_bps": 10})["detail"]
    assert "min_fee_bps" in refused({"min_fee_bps": 20, "max_fee_bps": 10,
                                     "fee_receiver": world.operator.address})["detail"]  # fmt: skip
    assert "capture_deadline_s" in refused({"capture_deadline_s": 100})["detail"]
    assert (
        "refund_deadline_s"
        in refused({"capture_deadline_s": 10_000, "refund_deadline_s": 9_000})["detail"]
    )
    assert "v2" in refused({"scheme": "authCapture", "protocols": "v1"})["detail"]


def test_the_official_typescript_client_pays_our_escrow_paywall(world: World) -> None:
    if (
        shutil.which("node") is None
        or not TS_CLIENT.is_file()
        or not (TS_NODE_PATH / "@x402" / "core").is_dir()
    ):
        pytest.skip("Node, @x402/core or the @x402/evm auth-capture client is not installed")
    receiver = Account.create().address
    request = paywall(world, 70_000, capture="manual", pay_to=receiver)
    account: LocalAccount = Account.create()
    mint(world.chain, world.stack.chain.token, world.stack.accounts[0], account.address, 70_000)
    done = subprocess.run(
        ["node", str(PAY_HELPER)],
        input=json.dumps(
            {
                "clientPath": str(TS_CLIENT),
                "key": "0x" + account.key.hex(),
                "url": request["url"],
                "asset": world.stack.chain.token,
                "maxAmount": "70000",
            }
        ).encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "NODE_PATH": str(TS_NODE_PATH)},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[:2000]
    out = json.loads(done.stdout)
    assert out["first"] == 402 and out["status"] == 200, out
    assert out["accepted"]["scheme"] == "auth-capture"  # the name that client registers
    assert json.loads(out["body"]) == {"secret": "escrowed"}
    assert out["settle"]["success"] is True and out["settle"]["transaction"], out
    payment = world.payment(out["paymentId"])
    assert payment["state"] == "authorized" and payment["payer"] == account.address
    assert world.balance(account.address) == 0 and world.balance(receiver) == 0
    captured = world.seller.run("release", {"payment_id": payment["id"]})["payment"]
    assert captured["state"] == "captured" and captured["captured_amount"] == "70000"
    assert world.balance(receiver) == 70_000


def _payment_row(world: World, payment_id: str) -> Any:
    from connector.storage.db import UnitOfWork
    from connector.storage.models.payments import Payment

    with UnitOfWork(world.stack.runtime.engine) as uow:
        return uow.session.get(Payment, payment_id)
