"""Receiving needs only an address: a connection with ``pay_to`` and no wallet key takes payments,
and every action that would have to sign from a wallet says clearly that the key is missing.
Also the paywall's protocol modes (v2 only, v1 only, both) and the v1 network name in
``X-PAYMENT-RESPONSE``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from eth_account import Account

from api.stack import Stack
from connector.chain import ChainClient
from connector.x402.codec import decode_b64_json
from connector.x402.networks import to_v1_name
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]


@pytest.fixture(scope="module")
def buyer(stack: Stack) -> Agent:
    return make_agent(stack, stack.accounts[5], {"max_per_payment": "5000000"})


@pytest.fixture(scope="module")
def payee() -> str:
    """An address nobody here holds the key of."""
    address: str = Account.create().address
    return address


@pytest.fixture(scope="module")
def receiver(stack: Stack, payee: str, buyer: Agent) -> Agent:
    response = buyer.http.post(
        "/v1/admin/connections",
        json={
            "name": "receive only",
            "network": stack.chain.network,
            "rpc_url": stack.chain.rpc_url,
            # no facilitator_url: the service's configured default is used
            "asset": stack.chain.token,
            "pay_to": payee.lower(),  # stored checksummed
        },
    )
    assert response.status_code == 201, response.text
    view = response.json()
    assert view["facilitator_url"] == stack.settings.default_facilitator_url
    assert view["has_wallet_key"] is False and view["wallet_address"] is None
    assert view["pay_to"] == payee
    # the agent's `account` is only used for balances: point it at a throwaway key
    return Agent(stack, buyer.http, view["id"], Account.create())


def balance_of(stack: Stack, address: str) -> int:
    return ChainClient(stack.chain.rpc_url).token_balance(stack.chain.token, address)


def test_a_connection_without_a_key_receives_at_its_pay_to_address(
    stack: Stack, buyer: Agent, receiver: Agent, payee: str
) -> None:
    before = balance_of(stack, payee), buyer.balance()
    request = receiver.run("receive", {"amount": "4321", "resource": {"ok": 1}})["payment_request"]
    assert request["pay_to"] == payee
    result = buyer.run("send", {"url": request["url"]})
    assert result["payment"]["state"] == "settled", result
    assert (balance_of(stack, payee), buyer.balance()) == (before[0] + 4321, before[1] - 4321)
    balance = receiver.run("balance", {})
    assert balance["address"] == payee and int(balance["balance"]) == before[0] + 4321


def test_signing_actions_on_a_receive_only_connection_name_the_missing_key(
    stack: Stack, buyer: Agent, receiver: Agent, payee: str
) -> None:
    request = receiver.run("receive", {"amount": "99"})["payment_request"]
    assert buyer.run("send", {"url": request["url"]})["payment"]["state"] == "settled"
    payments = receiver.http.get(
        "/v1/admin/payments",
        params={"connection_id": receiver.connection_id, "direction": "incoming"},
    ).json()["data"]
    paid = next(p for p in payments if p["amount"] == "99")
    before = balance_of(stack, payee)

    refund = receiver.fail("refund", {"payment_id": paid["id"]})
    assert refund["status"] == 409 and refund["type"].endswith("/wallet_key_missing")
    assert payee in refund["detail"]
    send = receiver.fail("send", {"to": buyer.account.address, "amount": "1"})
    assert send["status"] == 409 and send["type"].endswith("/wallet_key_missing")
    custodial = receiver.fail(
        "receive", {"amount": "5", "custodial": True, "beneficiary": buyer.account.address}
    )
    assert custodial["status"] == 409 and custodial["type"].endswith("/wallet_key_missing")
    # nothing moved, and the refused refund left the payment as it was
    assert balance_of(stack, payee) == before
    again = receiver.http.get(f"/v1/admin/payments/{paid['id']}").json()
    assert again["state"] == "settled"


def test_a_request_can_name_its_own_pay_to_on_a_connection_with_a_wallet(
    stack: Stack, buyer: Agent
) -> None:
    seller = make_agent(stack, stack.accounts[6])
    elsewhere = Account.create().address
    before = seller.balance(), balance_of(stack, elsewhere)
    request = seller.run("receive", {"amount": "700", "pay_to": elsewhere})["payment_request"]
    assert buyer.run("send", {"url": request["url"]})["payment"]["state"] == "settled"
    assert (seller.balance(), balance_of(stack, elsewhere)) == (before[0], before[1] + 700)
    # a refund must come from the address that received it: the seller's wallet is not it
    payment = seller.http.get(
        "/v1/admin/payments",
        params={"connection_id": seller.connection_id, "direction": "incoming"},
    ).json()["data"][0]
    refused = seller.fail("refund", {"payment_id": payment["id"]})
    assert refused["type"].endswith("/wallet_key_missing") and elsewhere in refused["detail"]


def _offer(receiver: Agent, protocols: str) -> dict[str, Any]:
    body = {"amount": "10", "protocols": protocols, "max_payments": 5}
    request: dict[str, Any] = receiver.run("receive", body)["payment_request"]
    assert request["protocols"] == protocols
    return request


@pytest.mark.parametrize("protocols", ["both", "v1", "v2"])
def test_paywall_offers_the_protocol_versions_it_was_asked_to(
    receiver: Agent, protocols: str
) -> None:
    request = _offer(receiver, protocols)
    answer = httpx.get(request["url"], timeout=30)
    assert answer.status_code == 402
    has_v2 = "payment-required" in answer.headers
    body_version = answer.json()["x402Version"]
    assert has_v2 == (protocols != "v1")
    assert body_version == (2 if protocols == "v2" else 1)
    if protocols == "v1":
        assert answer.json()["accepts"][0]["network"] == to_v1_name(receiver.stack.chain.network)


def test_v1_payment_gets_a_v1_network_name_and_a_v2_only_paywall_refuses_v1(
    stack: Stack, buyer: Agent, receiver: Agent
) -> None:
    v1_only = _offer(receiver, "v1")
    paid = buyer.run("send", {"url": v1_only["url"]})
    assert paid["payment"]["state"] == "settled"
    headers = paid["response"]["headers"]
    assert "payment-response" not in headers
    settlement = decode_b64_json(headers["x-payment-response"], "x-payment-response")
    assert settlement["network"] == to_v1_name(stack.chain.network)
    assert not settlement["network"].startswith("eip155:")

    # a v1 payment presented to a v2-only paywall is refused before the facilitator sees it
    v2_only = _offer(receiver, "v2")
    x_payment = _v1_payment_for(stack, buyer, v2_only)
    refused = httpx.get(v2_only["url"], headers={"x-payment": x_payment}, timeout=30)
    assert refused.status_code == 402 and "not offered" in refused.json()["error"]


def _v1_payment_for(stack: Stack, buyer: Agent, request: dict[str, Any]) -> str:
    from connector.x402 import exact_evm
    from connector.x402.codec import build_payment_payload, encode_b64_json
    from connector.x402.requirement import Requirement

    requirement = Requirement(
        scheme="exact", network=stack.chain.network, amount=int(request["amount"]),
        asset=request["asset"], pay_to=request["pay_to"], max_timeout_seconds=300,
        extra={"name": stack.chain.token_name, "version": stack.chain.token_version},
    )  # fmt: skip
    signed = exact_evm.sign_exact(buyer.account, requirement)
    return encode_b64_json(build_payment_payload(signed.payload, requirement, 1))


def test_a_refund_after_a_wallet_rotation_is_signed_by_the_wallet_that_was_paid(
    stack: Stack, buyer: Agent
) -> None:
    seller = make_agent(stack, stack.accounts[11])
    request = seller.run("receive", {"amount": "900"})["payment_request"]
    assert buyer.run("send", {"url": request["url"]})["payment"]["state"] == "settled"
    old_wallet = seller.account.address
    rotated = seller.http.post(f"/v1/admin/connections/{seller.connection_id}/rotate-wallet")
    assert rotated.status_code == 200 and rotated.json()["wallet_address"] != old_wallet
    payment = seller.http.get(
        "/v1/admin/payments",
        params={"connection_id": seller.connection_id, "direction": "incoming"},
    ).json()["data"][0]
    before = buyer.balance(), balance_of(stack, old_wallet)
    refund = seller.run("refund", {"payment_id": payment["id"]})
    assert refund["payment"]["state"] == "refunded"
    assert (buyer.balance(), balance_of(stack, old_wallet)) == (before[0] + 900, before[1] - 900)
