"""The paywall's chain reads (nonce used? balance?) over http.client, against anvil."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.chain.client import RpcError
from connector.chain.reads import PaymentStateReader, lightweight
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.local import LocalFacilitator
from connector.x402 import exact_evm as exact
from tests.fixtures.servers import LiveServer, free_port

pytestmark = [pytest.mark.chain]


@pytest.fixture
def reader(chain: DevChainInfo) -> Iterator[PaymentStateReader]:
    r = PaymentStateReader(chain.rpc_url, timeout_s=5, guard=None)
    yield r
    r.close()


def test_it_reads_what_the_chain_client_reads(
    reader: PaymentStateReader, chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount], local_facilitator: LocalFacilitator,
    requirement_for: Any,
) -> None:  # fmt: skip
    payer, fresh = accounts[2], accounts[12]
    nonce = "0x" + secrets.token_hex(32)
    assert reader.authorization_and_balance(chain.token, payer.address, nonce) == (
        chain_client.authorization_and_balance(chain.token, payer.address, nonce)
    )
    assert reader.balance_of(chain.token, fresh.address) == 0
    assert reader.balance_of(chain.token, payer.address.lower()) == chain_client.token_balance(
        chain.token, payer.address
    )
    # A used nonce reads as used once the transfer is mined.
    requirement = requirement_for(accounts[13].address, 5)
    signed = exact.sign_exact(payer, requirement)
    wire = {
        "x402Version": 2,
        "accepted": requirement.to_wire(2),
        "payload": signed.payload.to_wire(),
    }
    answer = local_facilitator.settle(
        {"x402Version": 2, "paymentPayload": wire, "paymentRequirements": requirement.to_wire(2)}
    )
    assert answer["success"], answer
    used, _ = reader.authorization_and_balance(chain.token, payer.address, signed.nonce)
    assert used and reader.authorization_used(chain.token, payer.address, signed.nonce)


def test_what_it_cannot_read_is_an_rpc_error(
    reader: PaymentStateReader, chain: DevChainInfo, accounts: list[LocalAccount]
) -> None:
    nobody = "0x" + "00" * 19 + "42"  # no contract there: eth_call answers "0x"
    with pytest.raises(RpcError):
        reader.authorization_and_balance(nobody, accounts[1].address, "0x" + "00" * 32)
    dead = PaymentStateReader(f"http://127.0.0.1:{free_port()}", timeout_s=2, guard=None)
    with pytest.raises(RpcError):
        dead.balance_of(chain.token, accounts[1].address)
    with pytest.raises(ValueError):
        reader.authorization_and_balance(chain.token, "0x1234", "0x" + "00" * 32)


@pytest.mark.parametrize(
    ("path", "sent"),
    [("", "/"), ("/", "/"), ("/v2/key", "/v2/key"), ("/rpc/", "/rpc/"), ("/v2?k=1", "/v2?k=1")],
)
def test_it_posts_to_the_urls_path_and_query(path: str, sent: str) -> None:
    seen: list[str] = []

    async def node(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        query = scope["query_string"].decode()
        seen.append(scope["raw_path"].decode() + (f"?{query}" if query else ""))
        word = "0x" + "00" * 31 + "07"
        body = json.dumps([{"jsonrpc": "2.0", "id": i, "result": word} for i in range(2)])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body.encode()})

    with LiveServer(node) as server:
        r = PaymentStateReader(server.url + path, timeout_s=5, guard=None)
        assert r.authorization_and_balance(
            "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "00" * 32
        ) == (
            True,
            7,
        )
        r.close()
    assert seen == [sent]


def test_urls_it_leaves_to_the_chain_client(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lightweight("http://127.0.0.1:8545") and lightweight("https://rpc.example/v2/key")
    assert not lightweight("https://user:secret@rpc.example/")  # basic auth: httpx sends it
    assert not lightweight("ws://127.0.0.1:8546")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert not lightweight("https://rpc.example/")
