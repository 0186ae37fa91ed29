"""Network ids both ways: v1 names (``base-sepolia``) and CAIP-2 (``eip155:84532``).

The connector stores CAIP-2 everywhere; v1 names exist only at the v1 wire edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from connector.x402.errors import UnknownNetwork

V1_NAMES: dict[str, int] = {
    "base": 8453,
    "base-sepolia": 84532,
    "ethereum": 1,
    "polygon": 137,
    "polygon-amoy": 80002,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
    "abstract": 2741,
    "abstract-testnet": 11124,
    "iotex": 4689,
    "sei": 1329,
    "sei-testnet": 1328,
    "peaq": 3338,
    "story": 1513,
    "educhain": 656476,
    "skale-base-sepolia": 1444673419,
    "megaeth": 4326,
    "monad": 143,
    "monad-testnet": 10143,
    "stable": 988,
    "stable-testnet": 2201,
    "celo": 42220,
    "flare": 14,
    "localhost": 31337,  # our dev chain (anvil)
}
_BY_CHAIN_ID = {chain_id: name for name, chain_id in V1_NAMES.items()}


@dataclass(frozen=True)
class KnownAsset:
    address: str
    name: str  # EIP-712 domain name
    version: str
    decimals: int
    symbol: str


#: USDC per network (EIP-712 domain as deployed). The dev chain's token is deployed per run and
#: configured on the connection, never listed here.
USDC: dict[str, KnownAsset] = {
    "eip155:8453": KnownAsset(
        "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2", 6, "USDC"
    ),
    "eip155:84532": KnownAsset(
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2", 6, "USDC"
    ),
    "eip155:1": KnownAsset(
        "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin", "2", 6, "USDC"
    ),
}


def chain_id_of(network: str) -> int:
    """Chain id from a CAIP-2 id or a v1 name; :class:`UnknownNetwork` otherwise."""
    value = network.strip()
    if value.startswith("eip155:"):
        ref = value.removeprefix("eip155:")
        if ref.isdigit() and 0 < len(ref) <= 12 and int(ref) > 0:
            return int(ref)
        raise UnknownNetwork(f"malformed CAIP-2 network id {network!r}", field="network")
    if value in V1_NAMES:
        return V1_NAMES[value]
    raise UnknownNetwork(
        f"unknown network {network!r}: use a CAIP-2 id such as eip155:84532 or a v1 name "
        "such as base-sepolia",
        field="network",
    )


def to_caip2(network: str) -> str:
    return f"eip155:{chain_id_of(network)}"


def to_v1_name(network: str) -> str:
    """The v1 name; chains without one keep their CAIP-2 id (accepted by our v1 parser)."""
    chain_id = chain_id_of(network)
    return _BY_CHAIN_ID.get(chain_id, f"eip155:{chain_id}")
