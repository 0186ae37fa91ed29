"""A redirect cannot steer a payment: the policy judges the URL that answered 402 (and every URL
on the way to it), and the signed payment header goes to that URL's host only.

Two real servers on two loopback hosts: ``127.0.0.1`` (the host the workflow asked for) redirects
to ``127.0.0.2``, which asks for payment. Both record every request they receive.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from api.stack import Stack
from tests.fixtures.servers import LiveServer
from tests.fixtures.stack import make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]
PAYMENT_HEADERS = ("payment-signature", "x-payment")


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    def paid(self) -> list[dict[str, str]]:
        return [r for r in self.requests if any(h in r for h in PAYMENT_HEADERS)]


def first_hop(target: str, seen: Recorder) -> FastAPI:
    app = FastAPI()

    @app.get("/report")
    def report(request: Request) -> Response:
        seen.requests.append({k.lower(): v for k, v in request.headers.items()})
        if any(h in request.headers for h in PAYMENT_HEADERS):
            return JSONResponse({"stolen": True})  # a payment header must never get here
        return RedirectResponse(target, 302)

    return app


def payee_host(stack: Stack, seen: Recorder) -> FastAPI:
    app = FastAPI()
    offer = {
        "scheme": "exact", "network": stack.chain.network, "amount": "25",
        "asset": stack.chain.token, "payTo": stack.accounts[19].address, "maxTimeoutSeconds": 60,
        "extra": {"name": stack.chain.token_name, "version": stack.chain.token_version},
    }  # fmt: skip
    doc = {"x402Version": 2, "resource": {"url": "/paid"}, "accepts": [offer]}
    required = base64.b64encode(json.dumps(doc).encode()).decode()

    @app.get("/paid")
    def paid(request: Request) -> Response:
        seen.requests.append({k.lower(): v for k, v in request.headers.items()})
        if "payment-signature" in request.headers:
            # accepted (not settled: the payee would capture later), the report is delivered
            return JSONResponse({"report": "ok"})
        return JSONResponse({}, 402, headers={"PAYMENT-REQUIRED": required})

    return app


@pytest.fixture
def servers(stack: Stack) -> Iterator[tuple[LiveServer, Recorder, LiveServer, Recorder]]:
    payee_seen, hop_seen = Recorder(), Recorder()
    payee = LiveServer(payee_host(stack, payee_seen), host="127.0.0.2")
    with payee, LiveServer(first_hop(payee.url + "/paid", hop_seen)) as hop:
        yield hop, hop_seen, payee, payee_seen


def test_domain_allow_is_judged_on_the_host_that_asked_for_payment(
    stack: Stack, servers: tuple[LiveServer, Recorder, LiveServer, Recorder]
) -> None:
    hop, hop_seen, payee, payee_seen = servers
    agent = make_agent(stack, stack.accounts[9], {"domain_allow": ["127.0.0.1"]})
    job = agent.job("send", {"url": hop.url + "/report"})
    assert job["status"] == "failed", job
    assert (job["error"]["code"], job["error"]["rule"]) == ("policy_refused", "domain_allow")
    assert "127.0.0.2" in job["error"]["detail"]
    payment: dict[str, Any] = job["result"]["payment"]
    assert payment["state"] == "rejected" and payment["resource_url"] == payee.url + "/paid"
    # nothing was signed, and no host received a payment header
    assert payment["nonce"] is None
    assert hop_seen.paid() == [] and payee_seen.paid() == []


def test_domain_deny_holds_for_a_host_on_the_way(
    stack: Stack, servers: tuple[LiveServer, Recorder, LiveServer, Recorder]
) -> None:
    hop, hop_seen, _, payee_seen = servers
    agent = make_agent(stack, stack.accounts[9], {"domain_deny": ["127.0.0.1"]})
    error = agent.fail("send", {"url": hop.url + "/report"})
    assert (error["code"], error["rule"]) == ("policy_refused", "domain_deny")
    assert hop_seen.paid() == [] and payee_seen.paid() == []


def test_the_signed_header_goes_only_to_the_host_that_issued_the_402(
    stack: Stack, servers: tuple[LiveServer, Recorder, LiveServer, Recorder]
) -> None:
    hop, hop_seen, payee, payee_seen = servers
    agent = make_agent(stack, stack.accounts[9], {"domain_allow": ["127.0.0.1", "127.0.0.2"]})
    job = agent.job("send", {"url": hop.url + "/report", "headers": {"x-trace": "t1"}})
    # the payee accepted without settling yet: the payment's fate is not known, the job pending
    assert job["status"] == "pending", job
    assert job["result"]["response"]["status"] == 200
    assert json.loads(job["result"]["response"]["body"]) == {"report": "ok"}
    payment = job["result"]["payment"]
    assert payment["resource_url"] == payee.url + "/paid"
    assert payment["payee"] == stack.accounts[19].address
    assert len(hop_seen.requests) == 1 and hop_seen.paid() == []  # the probe, nothing more
    assert len(payee_seen.paid()) == 1
    assert all(r["x-trace"] == "t1" for r in payee_seen.requests)  # the caller's headers go
