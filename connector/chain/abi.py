"""The few ABI pieces we call, encoded by hand with ``eth_abi``.

Raw JSON-RPC with pre-computed selectors is several times cheaper per call than building web3
contract objects, and the facilitator's settle path runs this on every payment.
"""

from __future__ import annotations

from eth_abi.abi import decode, encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak


def selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


def topic(signature: str) -> str:
    return "0x" + keccak(text=signature).hex()


BALANCE_OF = selector("balanceOf(address)")
AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
NAME = selector("name()")
VERSION = selector("version()")
DECIMALS = selector("decimals()")
TRANSFER = selector("transfer(address,uint256)")
MINT = selector("mint(address,uint256)")
TRANSFER_WITH_AUTHORIZATION_BYTES = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
TRANSFER_WITH_AUTHORIZATION_VRS = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
TRANSFER_TOPIC = topic("Transfer(address,address,uint256)")
AUTHORIZATION_USED_TOPIC = topic("AuthorizationUsed(address,bytes32)")


def call_data(sel: bytes, types: list[str], values: list[object]) -> str:
    return "0x" + (sel + encode(types, values)).hex()


def decode_one(type_: str, data_hex: str) -> object:
    raw = bytes.fromhex(data_hex[2:] if data_hex.startswith("0x") else data_hex)
    return decode([type_], raw)[0]


def address_topic(address: str) -> str:
    return "0x" + "00" * 12 + address.lower().removeprefix("0x")


def topic_address(value: str) -> str:
    return to_checksum_address("0x" + value[-40:])


def transfer_with_authorization_data(
    from_: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
    signature: bytes,
    form: str = "bytes",
) -> str:
    """Call data for either form; ``vrs`` splits a 65-byte signature for older tokens."""
    head: list[object] = [from_, to, value, valid_after, valid_before, nonce]
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32"]
    if form == "bytes":
        return call_data(TRANSFER_WITH_AUTHORIZATION_BYTES, [*types, "bytes"], [*head, signature])
    if len(signature) != 65:
        raise ValueError("the v,r,s form needs a 65-byte signature")
    v = signature[64] if signature[64] >= 27 else signature[64] + 27
    return call_data(
        TRANSFER_WITH_AUTHORIZATION_VRS,
        [*types, "uint8", "bytes32", "bytes32"],
        [*head, v, signature[:32], signature[32:64]],
    )
