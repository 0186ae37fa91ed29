"""Our ``send`` pays an ``authCapture`` 402 end to end: the funds end in the on-chain escrow
(not with the seller; the payment is ``authorized``), the seller's server captures part through
our facilitator and voids the rest, and the buyer's reconcile picks both up (``captured``).

The resource server here is a small test app (the connector's own paywall does not offer
``authCapture`` yet); it forwards the payer's payload to the stack's facilitator as
``type: authorize``, the way the spec's resource servers do.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from api.stack import Stack
from connector.chain import ChainClient
from connector.chain.auth_capture import EscrowClient
from connector.payments import maintenance
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import requirement, wall_now
from tests.fixtures.servers import LiveServer
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


def escrow_shop(stack: Stack, wire_requirement: dict[str, Any], seen: list[dict[str, Any]]) -> Any:
    app = FastAPI()

    def required() -> dict[str, str]:
        doc = {"x402Version": 2, "resource": {"url": "/held"}, "accepts": [wire_requirement]}
        return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(doc).encode()).decode()}

    @app.get("/held")
    def held(request: Request) -> Response:
        header = request.headers.get("payment-signature")
        if not header:
            return JSONResponse({"error": "pay"}, 402, headers=required())
        payment = json.loads(base64.b64decode(header))
        payment["payload"] = {**payment["payload"], "type": "authorize"}
        body = {"paymentPayload": payment, "paymentRequirements": wire_requirement}
        settled = httpx.post(f"{stack.facilitator_url}/settle", json=body, timeout=60).json()
        seen.append(settled)
        if not settled.get("success"):
            return JSONResponse({"error": settled.get("errorReason")}, 402, headers=required())
        encoded = base64.b64encode(json.dumps(settled).encode()).decode()
        return JSONResponse({"held": True}, headers={"PAYMENT-RESPONSE": encoded})

    return app


def test_our_send_pays_into_escrow_and_the_seller_captures_part(stack: Stack) -> None:
    buyer: Agent = make_agent(stack, stack.accounts[8])
    seller, operator = stack.accounts[13], stack.accounts[19]  # 19: the facilitator's gas key
    chain = ChainClient(stack.chain.rpc_url)
    now = wall_now()
    req = requirement(
        stack.chain, operator=operator.address, pay_to=seller.address, now=now, amount=40_000
    )
    seen: list[dict[str, Any]] = []
    buyer_before = chain.token_balance(stack.chain.token, buyer.account.address)
    seller_before = chain.token_balance(stack.chain.token, seller.address)
    with LiveServer(escrow_shop(stack, req.to_v2(), seen)) as server:
        result = buyer.run("send", {"url": server.url + "/held"})
    payment = result["payment"]
    # funded: the escrow holds the money (not "settled": it is not the seller's yet)
    assert payment["state"] == "authorized" and payment["tx_hash"] == seen[0]["transaction"], result
    assert payment["scheme"] == "authCapture"
    assert payment["escrow"]["collected"] and payment["escrow"]["held"] == "40000", payment
    assert seen[0]["operation"] == "authorize"
    # the money left the buyer but sits in the escrow, not with the seller
    assert chain.token_balance(stack.chain.token, buyer.account.address) == buyer_before - 40_000
    assert chain.token_balance(stack.chain.token, seller.address) == seller_before
    info = ac.payment_info_from_wire(seen[0]["paymentInfo"])
    assert info.payer == buyer.account.address
    escrow = EscrowClient(chain)
    assert escrow.state(info) == ac.EscrowState(True, 40_000, 0)

    def settle(inner: dict[str, Any]) -> dict[str, Any]:
        body = {
            "paymentPayload": {"x402Version": 2, "accepted": req.to_v2(), "payload": inner},
            "paymentRequirements": req.to_v2(),
        }
        answer: dict[str, Any] = httpx.post(
            f"{stack.facilitator_url}/settle", json=body, timeout=60
        ).json()
        return answer

    terms = info.to_wire()
    assert settle({"type": "capture", "paymentInfo": terms, "amount": "25000"})["success"]
    assert settle({"type": "void", "paymentInfo": terms})["success"]
    assert chain.token_balance(stack.chain.token, seller.address) == seller_before + 25_000
    assert chain.token_balance(stack.chain.token, buyer.account.address) == (buyer_before - 25_000)
    assert escrow.state(info) == ac.EscrowState(True, 0, 25_000)
    # the seller's capture and void were done outside the buyer's connector: reconcile reads them
    maintenance.reconcile(stack.runtime)
    seen_by_buyer = buyer.http.get(f"/v1/admin/payments/{payment['id']}").json()
    assert seen_by_buyer["state"] == "captured", seen_by_buyer
    assert seen_by_buyer["captured_amount"] == "25000"
    ledger = seen_by_buyer["escrow"]
    assert (ledger["held"], ledger["captured"], ledger["voided"]) == ("0", "25000", "15000")
    chain.close()


def test_send_refuses_an_auth_capture_offer_it_cannot_honour(stack: Stack) -> None:
    buyer = make_agent(stack, stack.accounts[8])
    chain = ChainClient(stack.chain.rpc_url)
    now = wall_now()
    chain.close()
    req = requirement(
        stack.chain,
        operator=stack.accounts[19].address,
        pay_to=stack.accounts[13].address,
        now=now,
    ).to_v2()
    req["extra"] = {**req["extra"], "authCaptureEscrow": stack.accounts[13].address}
    with LiveServer(escrow_shop(stack, req, [])) as server:
        job = buyer.job("send", {"url": server.url + "/held"})
    # A refused offer is a failed job (the job contract), carrying the rejected payment.
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "policy_refused", job
    payment = job["result"]["payment"]
    assert payment["state"] == "rejected", job
    assert payment["failure_code"] == "no_acceptable_offer"
    assert "invalid_authCapture_extra" in payment["failure_reason"]
