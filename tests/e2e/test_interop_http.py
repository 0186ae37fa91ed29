"""HTTP-level interop with the official x402 SDK, and hostile 402 servers.

* the SDK's Python client (requests adapter, v2 and v1) pays our paywall;
* our ``send`` pays a FastAPI app protected by the SDK's payment middleware (v2) and a v1-style
  server that speaks the legacy JSON body and ``X-PAYMENT``;
* malicious or broken 402 servers end in a clear failure, within the timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from x402 import x402ClientSync, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.clients import x402_requests
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_server
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.v1 import constants as v1_constants

from api.stack import Stack
from connector.facilitator.client import FacilitatorClient
from tests.fixtures.servers import LiveServer
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


@pytest.fixture(autouse=True)
def sdk_knows_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(v1_constants.V1_NETWORK_CHAIN_IDS, "localhost", 31337)


@pytest.fixture(scope="module")
def seller(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[7])


@pytest.fixture(scope="module")
def buyer(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[8])


@pytest.mark.parametrize("version", [2, 1])
def test_sdk_client_pays_our_paywall(version: int, stack: Stack, seller: Agent) -> None:
    payer = stack.accounts[9]
    client = x402ClientSync()
    register_exact_evm_client(client, payer, networks="eip155:31337")
    client.register_v1("localhost", ExactEvmSchemeV1(payer))
    client.set_spend_controls({"allowed_assets": True})
    if version == 1:  # a v1-only client: forget the v2 scheme so the 402 body is used
        client = x402ClientSync()
        client.register_v1("localhost", ExactEvmSchemeV1(payer))
        client.set_spend_controls({"allowed_assets": True})
    offer = seller.run("receive", {"amount": "321", "resource": {"v": version}})["payment_request"]
    before = seller.balance()
    session = x402_requests(client)
    if version == 1:
        # v1 clients read the JSON body; hide the v2 header the way a v1-era proxy would.
        first = httpx.get(offer["url"])
        body = first.json()
        assert body["x402Version"] == 1
        from x402.schemas.v1 import PaymentRequiredV1

        payload = client.create_payment_payload(PaymentRequiredV1.model_validate(body))
        header = base64.b64encode(
            payload.model_dump_json(by_alias=True, exclude_none=True).encode()
        ).decode()
        response = httpx.get(offer["url"], headers={"X-PAYMENT": header})
        assert response.status_code == 200, response.text
        settlement = json.loads(base64.b64decode(response.headers["x-payment-response"]))
    else:
        response_r = session.get(offer["url"], timeout=30)
        assert response_r.status_code == 200, response_r.text
        assert response_r.json() == {"v": 2}
        settlement = json.loads(base64.b64decode(response_r.headers["payment-response"]))
    assert settlement["success"] is True and settlement["transaction"].startswith("0x")
    assert seller.balance() == before + 321


def sdk_protected_app(stack: Stack, pay_to: str) -> FastAPI:
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=stack.facilitator_url))
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, "eip155:31337")
    routes = {
        "GET /premium": {
            "accepts": {
                "scheme": "exact",
                "payTo": pay_to,
                "price": {
                    "amount": "2500",
                    "asset": stack.chain.token,
                    "extra": {"name": stack.chain.token_name, "version": stack.chain.token_version},
                },
                "network": "eip155:31337",
            },
            "description": "premium data",
        }
    }
    app = FastAPI()
    middleware = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402(request: Request, call_next: Any) -> Response:
        return await middleware(request, call_next)

    @app.get("/premium")
    def premium() -> dict[str, str]:
        return {"data": "premium"}

    return app


def test_our_send_pays_an_sdk_protected_fastapi_app(stack: Stack, buyer: Agent) -> None:
    payee = stack.accounts[14]
    from connector.chain import ChainClient

    chain = ChainClient(stack.chain.rpc_url)
    before = chain.token_balance(stack.chain.token, payee.address)
    with LiveServer(sdk_protected_app(stack, payee.address)) as server:
        result = buyer.run("send", {"url": server.url + "/premium"})
    assert result["payment"]["state"] == "settled", result
    assert result["response"]["status"] == 200 and "premium" in result["response"]["body"]
    assert chain.token_balance(stack.chain.token, payee.address) == before + 2500


def v1_server(stack: Stack, pay_to: str) -> FastAPI:
    """A v1-era resource server: requirements in the JSON body, X-PAYMENT, X-PAYMENT-RESPONSE."""
    app = FastAPI()
    requirement = {
        "scheme": "exact", "network": "localhost", "maxAmountRequired": "1500",
        "resource": "http://127.0.0.1/v1", "description": "v1 thing",
        "mimeType": "application/json",
        "payTo": pay_to, "maxTimeoutSeconds": 120, "asset": stack.chain.token,
        "extra": {"name": stack.chain.token_name, "version": stack.chain.token_version},
    }  # fmt: skip

    @app.get("/v1thing")
    def thing(request: Request) -> Response:
        header = request.headers.get("x-payment")
        if not header:
            return JSONResponse({"x402Version": 1, "error": "pay", "accepts": [requirement]}, 402)
        payload = json.loads(base64.b64decode(header))
        with FacilitatorClient(stack.facilitator_url) as fac:
            settled = fac.settle(payload, requirement)
        if not settled["success"]:
            return JSONResponse(
                {"x402Version": 1, "error": settled["errorReason"], "accepts": [requirement]}, 402
            )
        encoded = base64.b64encode(json.dumps(settled).encode()).decode()
        return JSONResponse({"ok": True}, headers={"X-PAYMENT-RESPONSE": encoded})

    return app


def test_our_send_pays_a_v1_server(stack: Stack, buyer: Agent) -> None:
    payee = stack.accounts[15]
    with LiveServer(v1_server(stack, payee.address)) as server:
        result = buyer.run("send", {"url": server.url + "/v1thing"})
    assert result["payment"]["state"] == "settled" and result["payment"]["tx_hash"]
    assert result["payment"]["x402_version"] == 1


def hostile_app(stack: Stack) -> FastAPI:
    app = FastAPI()
    good = {
        "scheme": "exact", "network": "eip155:31337", "amount": "10", "asset": stack.chain.token,
        "payTo": stack.accounts[16].address, "maxTimeoutSeconds": 60,
        "extra": {"name": stack.chain.token_name, "version": stack.chain.token_version},
    }  # fmt: skip

    def v2(accepts: Any) -> dict[str, str]:
        doc = {"x402Version": 2, "resource": {"url": "x"}, "accepts": accepts}
        return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(doc).encode()).decode()}

    @app.get("/huge")
    def huge() -> StreamingResponse:
        return StreamingResponse(iter([b"{" * 65536] * 64), status_code=402)

    @app.get("/wrong-types")
    def wrong_types() -> Response:
        return JSONResponse({}, 402, headers=v2([{**good, "amount": 10.5, "payTo": 7}]))

    @app.get("/to-private")
    def to_private() -> RedirectResponse:
        return RedirectResponse("http://10.0.0.5/pay", 302)

    @app.get("/endless")
    def endless() -> Response:
        return JSONResponse({"error": "pay again"}, 402, headers=v2([good]))

    @app.get("/slow")
    async def slow() -> Response:
        await asyncio.sleep(30)
        return JSONResponse({}, 402)

    return app


@pytest.fixture(scope="module")
def hostile(stack: Stack) -> Iterator[LiveServer]:
    with LiveServer(hostile_app(stack)) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/huge", "x402_malformed"),
        ("/wrong-types", "x402_malformed"),
        ("/to-private", "unsafe_url"),
        ("/slow", "fetch_failed"),
    ],
)
def test_broken_402_servers_fail_clearly(
    hostile: LiveServer, buyer: Agent, path: str, expected: str
) -> None:
    error = buyer.fail("send", {"url": hostile.url + path})
    assert error["type"].endswith("/" + expected), error


def test_endless_402_loop_ends_in_failed_without_paying_twice(
    hostile: LiveServer, buyer: Agent, stack: Stack
) -> None:
    from connector.chain import ChainClient

    chain = ChainClient(stack.chain.rpc_url)
    payee = stack.accounts[16].address
    before = chain.token_balance(stack.chain.token, payee)
    job = buyer.job("send", {"url": hostile.url + "/endless"})
    assert job["status"] == "failed", job
    assert (job["error"]["code"], job["error"]["retryable"]) == ("payment_refused", False)
    payment = job["result"]["payment"]
    assert payment["state"] == "failed" and payment["failure_code"] == "payment_refused"
    assert chain.token_balance(stack.chain.token, payee) == before
