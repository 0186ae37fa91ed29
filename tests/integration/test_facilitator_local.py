"""Acceptance of the payment rail on real anvil: sign -> verify -> settle through our facilitator
over HTTP, balances read back; every kind of bad payment refused with its reason and no change."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.client import FacilitatorClient
from connector.x402 import exact_evm as exact
from connector.x402.codec import build_payment_payload
from connector.x402.requirement import Requirement

pytestmark = pytest.mark.chain


def pay(
    account: LocalAccount, requirement: Requirement, version: int = 2, **auth_changes: Any
) -> dict[str, Any]:
    signed = exact.sign_exact(account, requirement)
    payload = signed.payload
    if auth_changes:
        payload = dataclasses.replace(
            payload, authorization=dataclasses.replace(payload.authorization, **auth_changes)
        )
    return build_payment_payload(payload, requirement, version)


def test_settle_moves_exactly_the_amount(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    payer, payee = accounts[1], accounts[2]
    requirement = requirement_for(payee.address, 1_234_567)
    before = (
        chain_client.token_balance(chain.token, payer.address),
        chain_client.token_balance(chain.token, payee.address),
    )
    for version in (1, 2):
        wire = pay(payer, requirement, version)
        with FacilitatorClient(facilitator_url) as client:
            verdict = client.verify(wire, requirement.to_wire(version))
            assert verdict == {"isValid": True, "payer": payer.address}
            result = client.settle(wire, requirement.to_wire(version))
        assert result["success"] is True
        assert result["network"] == ("localhost" if version == 1 else chain.network)
        transfers = chain_client.find_token_transfers(result["transaction"], chain.token)
        assert [(t.from_, t.to, t.value) for t in transfers] == [
            (payer.address, payee.address, 1_234_567)
        ]
    assert chain_client.token_balance(chain.token, payer.address) == before[0] - 2 * 1_234_567
    assert chain_client.token_balance(chain.token, payee.address) == before[1] + 2 * 1_234_567


def _bad_cases(
    chain: DevChainInfo, accounts: list[LocalAccount], make: Callable[..., Requirement]
) -> list[tuple[str, dict[str, Any], Requirement, str]]:
    payer, payee, stranger = accounts[1], accounts[2], accounts[3]
    good = make(payee.address, 1000)
    now = int(time.time())
    other_chain = dataclasses.replace(good, network="eip155:8453")
    other_token = dataclasses.replace(good, asset="0x" + "ab" * 20)
    return [
        ("tampered amount", pay(payer, good, value=999), good, exact.VALUE_MISMATCH),
        ("wrong recipient", pay(payer, good, to=stranger.address), good, exact.RECIPIENT_MISMATCH),
        ("expired", pay(payer, good, valid_before=now - 1), good, exact.VALID_BEFORE),
        ("not yet valid", pay(payer, good, valid_after=now + 3600), good, exact.VALID_AFTER),
        (
            "signed for another chain id",
            build_payment_payload(exact.sign_exact(payer, other_chain).payload, good, 2),
            good,
            exact.BAD_SIGNATURE,
        ),
        (
            "signed for another token",
            build_payment_payload(exact.sign_exact(payer, other_token).payload, good, 2),
            good,
            exact.BAD_SIGNATURE,
        ),
        (
            "requirement for another token",
            pay(payer, other_token),
            other_token,
            "invalid_exact_evm_asset_mismatch",
        ),
        (
            "insufficient balance",
            pay(accounts[15], make(payee.address, 1000)),
            make(payee.address, 1000),
            exact.INSUFFICIENT_FUNDS,
        ),
        (
            "bad signature",
            pay(payer, good, from_=stranger.address),
            good,
            exact.BAD_SIGNATURE,
        ),
    ]


def test_bad_payments_are_refused_with_their_reason_and_move_nothing(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    watched = [accounts[i].address for i in (1, 2, 3, 15)]
    before = [chain_client.token_balance(chain.token, a) for a in watched]
    with FacilitatorClient(facilitator_url) as client:
        for name, wire, requirement, reason in _bad_cases(chain, accounts, requirement_for):
            verdict = client.verify(wire, requirement.to_v2())
            assert verdict["isValid"] is False, name
            assert verdict["invalidReason"] == reason, name
            settled = client.settle(wire, requirement.to_v2())
            assert settled == {
                **settled,
                "success": False,
                "errorReason": reason,
                "transaction": "",
            }, name
    assert [chain_client.token_balance(chain.token, a) for a in watched] == before


def test_replayed_nonce_is_refused_before_any_transaction(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    requirement = requirement_for(accounts[2].address, 500)
    wire = pay(accounts[1], requirement)
    with FacilitatorClient(facilitator_url) as client:
        first = client.settle(wire, requirement.to_v2())
        assert first["success"]
    # A fresh facilitator has no memory of the first settle: the chain is the judge.
    from connector.facilitator.local import LocalFacilitator

    fresh = LocalFacilitator(chain_client, accounts[19], network=chain.network)
    gas_nonce = chain_client.rpc("eth_getTransactionCount", [accounts[19].address, "latest"])
    body = {"x402Version": 2, "paymentPayload": wire, "paymentRequirements": requirement.to_v2()}
    again = fresh.settle(body)
    assert again["success"] is False
    assert again["errorReason"] == exact.NONCE_USED
    assert (
        chain_client.rpc("eth_getTransactionCount", [accounts[19].address, "latest"]) == gas_nonce
    )


def test_concurrent_settles_of_one_authorization_share_one_transaction(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    requirement = requirement_for(accounts[4].address, 777)
    wire = pay(accounts[5], requirement)
    before = chain_client.token_balance(chain.token, accounts[4].address)
    with FacilitatorClient(facilitator_url) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.settle(wire, requirement.to_v2()), range(8)))
    assert all(r["success"] for r in results)
    assert len({r["transaction"] for r in results}) == 1
    assert chain_client.token_balance(chain.token, accounts[4].address) == before + 777


def test_many_payers_settle_concurrently_without_gas_nonce_collisions(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    payee = accounts[9]
    requirement = requirement_for(payee.address, 10)
    wires = [pay(accounts[1 + i % 8], requirement) for i in range(24)]
    before = chain_client.token_balance(chain.token, payee.address)
    with FacilitatorClient(facilitator_url) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda w: client.settle(w, requirement.to_v2()), wires))
    assert [r["success"] for r in results] == [True] * 24
    assert len({r["transaction"] for r in results}) == 24
    assert chain_client.token_balance(chain.token, payee.address) == before + 240


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"x402Version": 2}',
        b'{"x402Version": 2, "paymentPayload": {"x402Version": 2, "accepted": {},'
        b' "payload": {}}, "paymentRequirements": {}}',
        b'{"x402Version": 1, "paymentPayload": {"x402Version": 1, "scheme": "upto",'
        b' "network": "base", "payload": {}}, "paymentRequirements": {}}',
        b'{"x402Version": 1, "paymentPayload": {"x402Version": 1, "scheme": "exact",'
        b' "network": "narnia", "payload": {}}, "paymentRequirements": {}}',
        b'{"x402Version": 1, "paymentPayload": {"x402Version": 7}}',
    ],
)
def test_malformed_requests_are_400_problems(facilitator_url: str, body: bytes) -> None:
    for path in ("/verify", "/settle"):
        response = httpx.post(
            facilitator_url + path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 400


def test_supported_lists_both_versions(
    facilitator_url: str, chain: DevChainInfo, accounts: list[LocalAccount]
) -> None:
    with FacilitatorClient(facilitator_url) as client:
        supported = client.supported()
    kinds = {(k["x402Version"], k["network"]) for k in supported["kinds"]}
    assert kinds == {(2, chain.network), (1, "localhost")}
    assert supported["signers"]["eip155:*"] == [accounts[19].address]


def test_settle_cache_answers_only_the_identical_payload_and_requirement(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    """Issue 10 item 6: once an authorization settled, a settle with another payTo or amount is
    verified again (and refused: the nonce is used), never answered with the old transaction."""
    requirement = requirement_for(accounts[2].address, 300)
    wire = pay(accounts[1], requirement)
    with FacilitatorClient(facilitator_url) as client:
        first = client.settle(wire, requirement.to_v2())
        assert first["success"]
        # the identical request again: the same transaction (idempotent settle)
        assert client.settle(wire, requirement.to_v2())["transaction"] == first["transaction"]
        for other in (
            requirement_for(accounts[3].address, 300),  # another payTo
            requirement_for(accounts[2].address, 299),  # another amount
        ):
            again = client.settle(wire, other.to_v2())
            assert again["success"] is False, again
            assert again["transaction"] == ""
            assert again["errorReason"] in (
                exact.NONCE_USED,
                exact.RECIPIENT_MISMATCH,
                exact.VALUE_MISMATCH,
                "invalid_payment_requirements",
            )
