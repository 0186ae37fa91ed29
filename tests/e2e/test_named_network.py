"""A connection configured only by network name pays and receives USDC, offline.

anvil pretends to be Base Sepolia (chain id 84532) and the dev token's code sits at Base Sepolia's
canonical USDC address with USDC's EIP-712 domain ("USDC", "2"). The connections name the
network (``base-sepolia`` / ``eip155:84532``), an RPC URL and a facilitator: no asset, no token
domain. Everything else comes from the network registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from api.facilitator_app import create_facilitator_app
from api.stack import Stack
from connector.chain import ChainClient
from connector.devchain.anvil import Anvil
from connector.devchain.deploy import DevChainInfo, setup_token_at
from connector.facilitator.local import LocalFacilitator
from connector.x402.codec import decode_b64_json
from connector.x402.networks import USDC
from tests.fixtures.servers import LiveServer
from tests.fixtures.stack import Agent

pytestmark = [pytest.mark.chain, pytest.mark.xdist_group("stack")]

BASE_SEPOLIA_USDC = USDC["eip155:84532"]


@dataclass
class FakeBaseSepolia:
    info: DevChainInfo
    client: ChainClient
    facilitator_url: str
    payer: LocalAccount
    node: Anvil

    def balance(self, address: str) -> int:
        return self.client.token_balance(BASE_SEPOLIA_USDC.address, address)


@pytest.fixture(scope="module")
def base_sepolia(stack: Stack) -> Iterator[FakeBaseSepolia]:
    payer = stack.accounts[7]
    with Anvil(chain_id=84532) as node:
        client = ChainClient(node.rpc_url)
        assert BASE_SEPOLIA_USDC.name and BASE_SEPOLIA_USDC.version
        info = setup_token_at(
            client,
            BASE_SEPOLIA_USDC.address,
            name=BASE_SEPOLIA_USDC.name,
            version=BASE_SEPOLIA_USDC.version,
            fund=[payer.address],
            amount=10_000_000,
        )
        facilitator = LocalFacilitator(
            client, stack.accounts[19], network="eip155:84532", assets={info.token}
        )
        with LiveServer(create_facilitator_app(facilitator)) as server:
            yield FakeBaseSepolia(info, client, server.url, payer, node)
        client.close()


def _connection(stack: Stack, http_agent: Agent, **fields: object) -> str:
    response = http_agent.http.post("/v1/admin/connections", json={"name": "named", **fields})
    assert response.status_code == 201, response.text
    view = response.json()
    assert view["asset"] is None and view["network"] == "eip155:84532"
    conn_id: str = view["id"]
    return conn_id


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Agent:
    import httpx

    http = httpx.Client(
        base_url=stack.api_url, headers={"authorization": f"Bearer {stack.admin_key}"}, timeout=60
    )
    return Agent(stack, http, "", Account.create())


def test_send_and_receive_usdc_on_a_connection_named_only_by_network(
    stack: Stack, admin: Agent, base_sepolia: FakeBaseSepolia
) -> None:
    payee = Account.create().address
    seller_id = _connection(
        stack, admin, network="eip155:84532", rpc_url=base_sepolia.info.rpc_url,
        facilitator_url=base_sepolia.facilitator_url, pay_to=payee,
    )  # fmt: skip
    buyer_id = _connection(
        stack, admin, network="base-sepolia", rpc_url=base_sepolia.info.rpc_url,
        facilitator_url=base_sepolia.facilitator_url,
        private_key="0x" + base_sepolia.payer.key.hex(),
    )  # fmt: skip
    seller = Agent(stack, admin.http, seller_id, Account.create())
    buyer = Agent(stack, admin.http, buyer_id, base_sepolia.payer)
    start = base_sepolia.balance(buyer.account.address)

    request = seller.run("receive", {"amount": "250000", "resource": {"ok": True}})[
        "payment_request"
    ]
    assert request["asset"] == BASE_SEPOLIA_USDC.address and request["network"] == "eip155:84532"
    paid = buyer.run("send", {"url": request["url"]})
    assert paid["payment"]["state"] == "settled", paid
    assert paid["payment"]["asset"] == BASE_SEPOLIA_USDC.address
    assert base_sepolia.balance(payee) == 250_000

    # a v1 payment names the v1 network in X-PAYMENT-RESPONSE
    v1 = seller.run("receive", {"amount": "1000", "protocols": "v1"})["payment_request"]
    paid_v1 = buyer.run("send", {"url": v1["url"]})
    assert paid_v1["payment"]["state"] == "settled"
    header = paid_v1["response"]["headers"]["x-payment-response"]
    assert decode_b64_json(header, "x-payment-response")["network"] == "base-sepolia"

    # a direct payment to an address, same connection, no asset anywhere
    direct = buyer.run("send", {"to": payee, "amount": "5"})
    assert direct["payment"]["state"] == "settled"
    assert base_sepolia.balance(payee) == 251_005
    assert base_sepolia.balance(buyer.account.address) == start - 251_005
    balance = buyer.run("balance", {})
    assert balance["asset"] == BASE_SEPOLIA_USDC.address
    assert int(balance["balance"]) == start - 251_005


def test_a_reorg_that_removes_the_settlement_puts_it_back_to_settling_and_it_settles_once(
    stack: Stack, admin: Agent, base_sepolia: FakeBaseSepolia
) -> None:
    from datetime import UTC, datetime, timedelta

    from connector.payments import maintenance
    from connector.payments.confirmations import recheck_settlements
    from connector.payments.driver import drive

    payee = Account.create().address
    seller_id = _connection(
        stack, admin, network="base-sepolia", rpc_url=base_sepolia.info.rpc_url,
        facilitator_url=base_sepolia.facilitator_url, pay_to=payee,
    )  # fmt: skip
    buyer_id = _connection(
        stack, admin, network="base-sepolia", rpc_url=base_sepolia.info.rpc_url,
        facilitator_url=base_sepolia.facilitator_url,
        private_key="0x" + base_sepolia.payer.key.hex(),
    )  # fmt: skip
    seller = Agent(stack, admin.http, seller_id, Account.create())
    buyer = Agent(stack, admin.http, buyer_id, base_sepolia.payer)
    start = base_sepolia.balance(buyer.account.address)
    request = seller.run("receive", {"amount": "7000"})["payment_request"]

    snapshot = base_sepolia.node.snapshot()
    job = buyer.job("send", {"url": request["url"]})
    assert job["status"] == "succeeded", job
    paid = job["result"]
    assert paid["payment"]["state"] == "settled"
    assert base_sepolia.balance(payee) == 7000

    base_sepolia.node.revert(snapshot)  # the block with the settlement is gone
    ChainClient.forget_all_nonces()
    assert base_sepolia.balance(payee) == 0
    recheck_settlements(stack.runtime)

    def payments(conn_id: str) -> list[dict[str, object]]:
        data: list[dict[str, object]] = admin.http.get(
            "/v1/admin/payments", params={"connection_id": conn_id}
        ).json()["data"]
        return data

    incoming = payments(seller_id)[0]
    assert incoming["state"] == "settling" and "vanished" in str(incoming["failure_reason"])
    assert payments(buyer_id)[0]["state"] == "settling"
    # The send's job follows its payment: still succeeded (final), but showing it as it is.
    following = admin.http.get(f"/v1/jobs/{job['id']}").json()
    assert following["status"] == "succeeded"
    assert following["result"]["payment"]["state"] == "settling"
    assert following["result"]["payment"]["tx_hash"] is None

    # The reconciler drives it again with the same authorization: it settles, exactly once.
    assert drive(stack.runtime, str(incoming["id"])) == "settled"
    later = datetime.now(UTC) + timedelta(minutes=10)
    maintenance.reconcile(stack.runtime, now=later)  # the payer's side sees the nonce used
    assert payments(buyer_id)[0]["state"] == "settled"
    assert payments(seller_id)[0]["tx_hash"]
    settled_again = admin.http.get(f"/v1/jobs/{job['id']}").json()
    assert settled_again["status"] == "succeeded"
    assert settled_again["result"]["payment"]["state"] == "settled"
    assert settled_again["result"]["payment"]["tx_hash"] == payments(buyer_id)[0]["tx_hash"]
    assert base_sepolia.balance(payee) == 7000
    assert base_sepolia.balance(buyer.account.address) == start - 7000
    assert recheck_settlements(stack.runtime) == 0  # the new receipt is there
