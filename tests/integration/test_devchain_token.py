"""DevUSD on real anvil: the EIP-3009 functions beyond plain transferWithAuthorization."""

from __future__ import annotations

import secrets
import time

import pytest
from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from eth_utils.crypto import keccak

from connector.chain import ChainClient, RpcError, abi
from connector.devchain.deploy import DevChainInfo
from connector.x402 import exact_evm

pytestmark = pytest.mark.chain
RECEIVE_TYPEHASH = keccak(
    text="ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)
CANCEL_TYPEHASH = keccak(text="CancelAuthorization(address authorizer,bytes32 nonce)")


def sign(account: LocalAccount, chain: DevChainInfo, struct_hash: bytes) -> bytes:
    separator = exact_evm.domain_separator(
        chain.token_name, chain.token_version, chain.chain_id, chain.token
    )
    digest = keccak(b"\x19\x01" + separator + struct_hash)
    signed = account.unsafe_sign_hash(Hash32(digest))
    return signed.r.to_bytes(32, "big") + signed.s.to_bytes(32, "big") + bytes([signed.v])


def receive_call(frm: str, to: str, value: int, nonce: bytes, sig: bytes) -> str:
    now = int(time.time())
    return abi.call_data(
        abi.selector(
            "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
        ),
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [frm, to, value, 0, now + 600, nonce, sig],
    )


def receive_struct(frm: str, to: str, value: int, nonce: bytes) -> bytes:
    from eth_abi.abi import encode

    now = int(time.time())
    return keccak(
        encode(
            ["bytes32", "address", "address", "uint256", "uint256", "uint256", "bytes32"],
            [RECEIVE_TYPEHASH, frm, to, value, 0, now + 600, nonce],
        )
    )


def test_vrs_and_bytes_forms_both_transfer(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    from connector.x402.requirement import Requirement

    req = Requirement(
        scheme="exact", network=chain.network, amount=70, asset=chain.token,
        pay_to=accounts[3].address, max_timeout_seconds=600,
        extra={"name": chain.token_name, "version": chain.token_version},
    )  # fmt: skip
    before = chain_client.token_balance(chain.token, accounts[3].address)
    for form in ("bytes", "vrs"):
        payload = exact_evm.sign_exact(accounts[1], req).payload
        a = payload.authorization
        tx = chain_client.send_transfer_with_authorization(
            chain.token, from_=a.from_, to=a.to, value=a.value, valid_after=a.valid_after,
            valid_before=a.valid_before, nonce=a.nonce, signature=payload.signature,
            gas_key=accounts[18], form=form,
        )  # fmt: skip
        assert chain_client.wait_for_receipt(tx).status == 1
        assert chain_client.authorization_state(chain.token, a.from_, a.nonce)
    assert chain_client.token_balance(chain.token, accounts[3].address) == before + 140


def test_receive_with_authorization_only_by_the_payee(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    payer, payee, stranger = accounts[1], accounts[2], accounts[3]
    nonce = secrets.token_bytes(32)
    sig = sign(payer, chain, receive_struct(payer.address, payee.address, 5, nonce))
    data = receive_call(payer.address, payee.address, 5, nonce, sig)
    with pytest.raises(RpcError, match="payee"):
        chain_client.rpc(
            "eth_call", [{"from": stranger.address, "to": chain.token, "data": data}, "latest"]
        )
    before = chain_client.token_balance(chain.token, payee.address)
    tx = chain_client.send_transaction(payee, chain.token, data, gas=150_000)
    assert chain_client.wait_for_receipt(tx).status == 1
    assert chain_client.token_balance(chain.token, payee.address) == before + 5


def test_canceled_authorization_cannot_be_used(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    from eth_abi.abi import encode

    payer, payee = accounts[4], accounts[5]
    nonce = secrets.token_bytes(32)
    cancel_sig = sign(
        payer,
        chain,
        keccak(encode(["bytes32", "address", "bytes32"], [CANCEL_TYPEHASH, payer.address, nonce])),
    )
    cancel = abi.call_data(
        abi.selector("cancelAuthorization(address,bytes32,bytes)"),
        ["address", "bytes32", "bytes"],
        [payer.address, nonce, cancel_sig],
    )
    tx = chain_client.send_transaction(accounts[18], chain.token, cancel, gas=100_000)
    assert chain_client.wait_for_receipt(tx).status == 1
    assert chain_client.authorization_state(chain.token, payer.address, "0x" + nonce.hex())
    sig = sign(payer, chain, receive_struct(payer.address, payee.address, 5, nonce))
    data = receive_call(payer.address, payee.address, 5, nonce, sig)
    with pytest.raises(RpcError, match="used or canceled"):
        chain_client.rpc(
            "eth_call", [{"from": payee.address, "to": chain.token, "data": data}, "latest"]
        )


def test_only_the_minter_mints(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    data = abi.call_data(abi.MINT, ["address", "uint256"], [accounts[2].address, 1])
    with pytest.raises(RpcError, match="minter"):
        chain_client.rpc(
            "eth_call", [{"from": accounts[2].address, "to": chain.token, "data": data}, "latest"]
        )


def test_unreachable_rpc_is_a_typed_error_after_bounded_retries() -> None:
    from tests.fixtures.servers import free_port

    client = ChainClient(f"http://127.0.0.1:{free_port()}", timeout_s=1, max_attempts=2)
    with pytest.raises(RpcError, match="unreachable after 2 attempts"):
        client.chain_id()
