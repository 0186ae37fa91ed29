"""Interop with the official x402 Python SDK (2.25), both wire versions, on real anvil.

* a payload made by the SDK's client is verified and settled by our facilitator;
* a payload made by us is verified and settled by the SDK's facilitator (its own web3 signer);
* headers encode/decode identically in both directions.

The SDK has no v1 name for a local chain, so the tests register ours (``localhost`` = 31337) in
the SDK's v1 network table — a configuration step, not a change of its behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from x402 import x402ClientSync, x402FacilitatorSync
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_facilitator
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.v1 import constants as v1_constants
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

from connector.chain import ChainClient
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.client import FacilitatorClient
from connector.x402 import exact_evm as exact
from connector.x402.codec import (
    build_payment_payload,
    decode_b64_json,
    encode_b64_json,
    parse_payment_payload,
    parse_payment_required,
)
from connector.x402.requirement import Requirement

pytestmark = pytest.mark.chain


@pytest.fixture(autouse=True)
def sdk_knows_localhost(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(v1_constants.V1_NETWORK_CHAIN_IDS, "localhost", 31337)
    yield


def sdk_client(account: LocalAccount) -> x402ClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, account, networks="eip155:31337")
    client.register_v1("localhost", ExactEvmSchemeV1(account))
    client.set_spend_controls({"allowed_assets": True})  # our dev token is not a default asset
    return client


def sdk_payload(account: LocalAccount, requirement: Requirement, version: int) -> dict[str, Any]:
    client = sdk_client(account)
    if version == 2:
        offer: Any = PaymentRequired(
            accepts=[PaymentRequirements.model_validate(requirement.to_v2())],
            resource={"url": "http://127.0.0.1/r"},
        )
    else:
        offer = PaymentRequiredV1(
            x402_version=1, accepts=[PaymentRequirementsV1.model_validate(requirement.to_v1())]
        )
    payload = client.create_payment_payload(offer)
    wire: dict[str, Any] = payload.model_dump(by_alias=True, exclude_none=True)
    return wire


@pytest.mark.parametrize("version", [1, 2])
def test_sdk_client_payload_settles_through_our_facilitator(
    version: int,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
    requirement_for: Callable[..., Requirement],
) -> None:
    payer, payee = accounts[6], accounts[7]
    requirement = requirement_for(payee.address, 4242)
    wire = sdk_payload(payer, requirement, version)
    before = chain_client.token_balance(chain.token, payee.address)
    with FacilitatorClient(facilitator_url) as client:
        assert client.verify(wire, requirement.to_wire(version)) == {
            "isValid": True,
            "payer": payer.address,
        }
        settled = client.settle(wire, requirement.to_wire(version))
    assert settled["success"] is True
    assert chain_client.token_balance(chain.token, payee.address) == before + 4242


@pytest.mark.parametrize("version", [1, 2])
def test_our_payload_is_accepted_and_settled_by_the_sdk_facilitator(
    version: int,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    requirement_for: Callable[..., Requirement],
) -> None:
    payer, payee = accounts[8], accounts[2]
    requirement = requirement_for(payee.address, 999)
    wire = build_payment_payload(exact.sign_exact(payer, requirement).payload, requirement, version)
    signer = FacilitatorWeb3Signer("0x" + accounts[18].key.hex(), chain.rpc_url)
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, signer, networks="eip155:31337")
    if version == 2:
        payload: Any = PaymentPayload.model_validate(wire)
        reqs: Any = PaymentRequirements.model_validate(requirement.to_v2())
    else:
        from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1 as FacV1

        facilitator.register_v1(["localhost"], FacV1(signer))
        payload = PaymentPayloadV1.model_validate(wire)
        reqs = PaymentRequirementsV1.model_validate(requirement.to_v1())
    verdict = facilitator.verify(payload, reqs)
    assert verdict.is_valid, verdict
    before = chain_client.token_balance(chain.token, payee.address)
    settled = facilitator.settle(payload, reqs)
    assert settled.success, settled
    assert chain_client.token_balance(chain.token, payee.address) == before + 999


def test_headers_round_trip_between_sdk_and_us(
    accounts: list[LocalAccount], requirement_for: Callable[..., Requirement]
) -> None:
    requirement = requirement_for(accounts[2].address, 5)
    # SDK-encoded 402 header -> our parser
    sdk_offer = PaymentRequired(
        accepts=[PaymentRequirements.model_validate(requirement.to_v2())],
        resource={"url": "http://127.0.0.1/r", "description": "d"},
    )
    offer = parse_payment_required(
        402, {"PAYMENT-REQUIRED": encode_payment_required_header(sdk_offer)}, None
    )
    assert offer.version == 2 and offer.accepts[0] == requirement.__class__(
        **{**requirement.__dict__, "resource": None, "description": None, "mime_type": None}
    )
    # SDK payment header -> our parser; our header -> SDK parser
    sdk_wire = sdk_payload(accounts[1], requirement, 2)
    header = encode_payment_signature_header(PaymentPayload.model_validate(sdk_wire))
    ours = parse_payment_payload(decode_b64_json(header, "PAYMENT-SIGNATURE"))
    assert ours.payer == accounts[1].address and ours.accepted == offer.accepts[0]
    mine = build_payment_payload(exact.sign_exact(accounts[1], requirement).payload, requirement, 2)
    decoded = decode_payment_signature_header(encode_b64_json(mine))
    assert decoded.payload["authorization"]["from"] == accounts[1].address
    assert decoded.accepted.amount == "5"
