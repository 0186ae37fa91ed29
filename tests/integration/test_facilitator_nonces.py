"""The facilitator's gas key under load and trouble: 50 concurrent settles from one signer with
locally managed, pipelined nonces and no nonce error; a dropped transaction is resubmitted, a
replaced one is adopted, and neither pays twice."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.devchain.anvil import Anvil
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.local import SETTLEMENT_PENDING, LocalFacilitator
from connector.x402 import exact_evm as exact
from connector.x402.codec import build_payment_payload
from connector.x402.requirement import Requirement

pytestmark = pytest.mark.chain


def _body(payer: LocalAccount, requirement: Requirement) -> dict[str, object]:
    payload = exact.sign_exact(payer, requirement).payload
    return {
        "x402Version": 2,
        "paymentPayload": build_payment_payload(payload, requirement, 2),
        "paymentRequirements": requirement.to_v2(),
    }


@pytest.fixture
def fresh_facilitator(
    chain: DevChainInfo, accounts: list[LocalAccount]
) -> Iterator[tuple[LocalFacilitator, ChainClient]]:
    """Own client (own nonce allocator and counters) and a gas key no other test uses here;
    concurrent calls share JSON-RPC batches, as in a deployed facilitator."""
    client = ChainClient(chain.rpc_url, combine=True)
    yield (
        LocalFacilitator(
            client, accounts[17], network=chain.network, assets={chain.token},
            receipt_timeout_s=0.5, max_in_flight=16,
        ),
        client,
    )  # fmt: skip
    client.close()


@pytest.fixture
def manual_mining(devchain_node: tuple[Anvil, DevChainInfo]) -> Iterator[Anvil]:
    node = devchain_node[0]
    node._rpc("evm_setAutomine", [False])
    try:
        yield node
    finally:
        node._rpc("evm_setAutomine", [True])


def test_fifty_concurrent_settles_from_one_signer_have_no_nonce_error(
    chain: DevChainInfo,
    accounts: list[LocalAccount],
    fresh_facilitator: tuple[LocalFacilitator, ChainClient],
    requirement_for: Callable[..., Requirement],
) -> None:
    facilitator, client = fresh_facilitator
    gas_key = accounts[17].address
    payee = accounts[9].address
    requirement = requirement_for(payee, 3)
    bodies = [_body(accounts[1 + i % 8], requirement) for i in range(50)]
    nonce_before = int(client.rpc("eth_getTransactionCount", [gas_key, "latest"]), 16)
    balance_before = client.token_balance(chain.token, payee)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(facilitator.settle, bodies))
    assert [r["success"] for r in results] == [True] * 50, results
    assert len({r["transaction"] for r in results}) == 50
    assert client.nonce_errors == 0
    nonce_after = int(client.rpc("eth_getTransactionCount", [gas_key, "latest"]), 16)
    assert nonce_after - nonce_before == 50  # every nonce used once, no gap, no replacement
    assert client.token_balance(chain.token, payee) == balance_before + 150
    assert client.combiner is not None  # the 50 settles' calls shared round trips
    assert client.combiner.round_trips < client.combiner.calls


def test_a_dropped_settlement_is_resubmitted_and_pays_once(
    chain: DevChainInfo,
    accounts: list[LocalAccount],
    fresh_facilitator: tuple[LocalFacilitator, ChainClient],
    requirement_for: Callable[..., Requirement],
    manual_mining: Anvil,
    caplog: pytest.LogCaptureFixture,
) -> None:
    facilitator, client = fresh_facilitator
    payee = accounts[8].address
    body = _body(accounts[2], requirement_for(payee, 41))
    before = client.token_balance(chain.token, payee)

    first = facilitator.settle(body)  # not mined: the outcome is unknown, never a failure
    assert first["success"] is False and first["errorReason"] == SETTLEMENT_PENDING
    dropped = first["transaction"]
    assert dropped
    manual_mining._rpc("anvil_dropTransaction", [dropped])
    assert client.rpc("eth_getTransactionByHash", [dropped]) is None

    manual_mining._rpc("evm_setAutomine", [True])
    again = facilitator.settle(body)
    assert again["success"] is True, again
    # the node's nonce count is back at the dropped one: the same transaction is sent again
    assert any("resubmitting" in r.getMessage() for r in caplog.records)
    assert client.get_receipt(again["transaction"]) is not None
    assert client.token_balance(chain.token, payee) == before + 41
    assert facilitator.settle(body)["transaction"] == again["transaction"]  # remembered
    assert client.token_balance(chain.token, payee) == before + 41


def test_a_settlement_replaced_by_another_submission_is_adopted(
    chain: DevChainInfo,
    accounts: list[LocalAccount],
    fresh_facilitator: tuple[LocalFacilitator, ChainClient],
    requirement_for: Callable[..., Requirement],
    manual_mining: Anvil,
) -> None:
    facilitator, client = fresh_facilitator
    payee = accounts[8].address
    requirement = requirement_for(payee, 43)
    body = _body(accounts[3], requirement)
    before = client.token_balance(chain.token, payee)
    first = facilitator.settle(body)
    assert first["errorReason"] == SETTLEMENT_PENDING
    manual_mining._rpc("anvil_dropTransaction", [first["transaction"]])
    # Someone else (another facilitator, another gas key) submits the same authorization.
    payload = body["paymentPayload"]
    assert isinstance(payload, dict)
    auth = payload["payload"]["authorization"]
    other = client.send_transfer_with_authorization(
        chain.token, from_=auth["from"], to=auth["to"], value=int(auth["value"]),
        valid_after=int(auth["validAfter"]), valid_before=int(auth["validBefore"]),
        nonce=auth["nonce"], signature=bytes.fromhex(payload["payload"]["signature"][2:]),
        gas_key=accounts[16],
    )  # fmt: skip
    manual_mining._rpc("evm_mine", [])
    again = facilitator.settle(body)
    assert again["success"] is True and again["transaction"] == other
    assert client.token_balance(chain.token, payee) == before + 43


def test_settlement_waits_for_the_configured_confirmations(
    chain: DevChainInfo,
    accounts: list[LocalAccount],
    requirement_for: Callable[..., Requirement],
    devchain_node: tuple[Anvil, DevChainInfo],
) -> None:
    client = ChainClient(chain.rpc_url)
    facilitator = LocalFacilitator(
        client, accounts[17], network=chain.network, assets={chain.token},
        receipt_timeout_s=0.3, confirmations=3,
    )  # fmt: skip
    try:
        body = _body(accounts[4], requirement_for(accounts[8].address, 5))
        first = facilitator.settle(body)  # mined in one block: 1 confirmation of 3
        assert first["success"] is False and first["errorReason"] == SETTLEMENT_PENDING
        receipt = client.get_receipt(first["transaction"])
        assert receipt is not None and receipt.status == 1
        devchain_node[0]._rpc("evm_mine", [])
        assert facilitator.settle(body)["errorReason"] == SETTLEMENT_PENDING  # 2 of 3
        devchain_node[0]._rpc("evm_mine", [])
        done = facilitator.settle(body)
        assert done["success"] is True and done["transaction"] == first["transaction"]
    finally:
        client.close()
