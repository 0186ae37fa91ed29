"""The EVM networks x402 users pay on: ids both ways, canonical USDC, block time, confirmations.

The connector stores CAIP-2 ids (``eip155:84532``) everywhere; v1 names (``base-sepolia``) exist
only at the v1 wire edge. Every fact below names where it comes from:

* ``[py-v1]`` x402 2.25.0 (PyPI), ``x402/mechanisms/evm/v1/constants.py``: v1 names, chain ids.
* ``[py-assets]`` x402 2.25.0, ``x402/mechanisms/evm/default_assets.py`` — default stablecoin per
  network: address and EIP-712 domain (name, version), decimals.
* ``[ts-assets]`` x402-foundation/x402, ``typescript/packages/mechanisms/evm/src/defaultAssets.ts``
  (the same table in the TypeScript SDK).
* ``[ts-legacy]`` x402-foundation/x402, ``typescript/packages/legacy/x402/src/types/shared/evm/
  config.ts`` — the v1 TypeScript SDK's USDC address + EIP-712 name per chain id (its domain
  version is "2" for every entry).
* ``[circle]`` Circle's published USDC contract addresses
  (developers.circle.com/stablecoins/usdc-contract-addresses). For these entries no official
  x402 SDK lists the EIP-712 domain, so it is left ``None`` here and read from the token
  (``name()``/``version()``) the first time it is needed, never guessed.
* Block times: the chains' own documentation — Ethereum: 12 s slots (consensus specs,
  ``SECONDS_PER_SLOT = 12``); OP Stack chains (Base, Optimism): 2 s (docs.optimism.io, "block
  time"; docs.base.org); Arbitrum: 0.25 s (docs.arbitrum.io, "block numbers and time");
  Polygon PoS: ~2 s (docs.polygon.technology); Avalanche C-Chain: ~2 s (docs.avax.network);
  the other chains: approximate figures from their docs (see that section's note).
* Default confirmations are OUR policy, not a fact: 1 where a centralized sequencer orders
  blocks (OP Stack, Arbitrum) and on fast-finality chains (Avalanche); 2 on Ethereum (a
  one-block reorg is not rare); 5 on Polygon PoS (its reorgs have been several blocks deep);
  1 on test networks and the dev chain. An operator overrides them per facilitator network.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_utils.address import to_checksum_address

from connector.x402.errors import UnknownNetwork


@dataclass(frozen=True)
class KnownAsset:
    address: str
    name: str | None  # EIP-712 domain name; None = read it from the token
    version: str | None  # EIP-712 domain version; None = read it from the token
    decimals: int
    symbol: str


@dataclass(frozen=True)
class Network:
    chain_id: int
    v1_name: str | None  # None: the v1 wire uses the CAIP-2 id
    title: str
    testnet: bool
    usdc: KnownAsset | None
    block_time_s: float
    confirmations: int

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"


def _usdc(address: str, name: str | None, version: str | None = "2") -> KnownAsset:
    return KnownAsset(to_checksum_address(address), name, version, 6, "USDC")


_ALL: list[Network] = [
    # --- the networks issue 14 names ----------------------------------------------------------
    # Base: [py-v1] name; [py-assets]/[ts-assets] USDC + domain "USD Coin"/"2".
    Network(8453, "base", "Base", False,
            _usdc("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"), 2.0, 1),
    # Base Sepolia: [py-v1]; [py-assets]/[ts-assets] domain "USDC"/"2".
    Network(84532, "base-sepolia", "Base Sepolia", True,
            _usdc("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"), 2.0, 1),
    # Polygon PoS: [py-v1]; [py-assets]/[ts-assets] native USDC "USD Coin"/"2".
    Network(137, "polygon", "Polygon", False,
            _usdc("0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin"), 2.0, 5),
    # Polygon Amoy: [py-v1]; [ts-legacy] USDC "USDC" (version "2").
    Network(80002, "polygon-amoy", "Polygon Amoy", True,
            _usdc("0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582", "USDC"), 2.0, 1),
    # Avalanche C-Chain: [py-v1]; [py-assets] "USD Coin"/"2".
    Network(43114, "avalanche", "Avalanche C-Chain", False,
            _usdc("0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E", "USD Coin"), 2.0, 1),
    # Avalanche Fuji: [py-v1]; [ts-legacy] "USD Coin" (version "2").
    Network(43113, "avalanche-fuji", "Avalanche Fuji", True,
            _usdc("0x5425890298aed601595a70AB815c96711a31Bc65", "USD Coin"), 2.0, 1),
    # Arbitrum One: no v1 name in [py-v1]; [py-assets]/[ts-assets] "USD Coin"/"2".
    Network(42161, None, "Arbitrum One", False,
            _usdc("0xaf88d065e77c8cC2239327C5EDb3A432268e5831", "USD Coin"), 0.25, 1),
    # Arbitrum Sepolia: [py-assets]/[ts-assets] "USD Coin"/"2".
    Network(421614, None, "Arbitrum Sepolia", True,
            _usdc("0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", "USD Coin"), 0.25, 1),
    # Optimism: no x402 SDK lists it; [circle] native USDC address, domain read from the token.
    Network(10, None, "OP Mainnet", False,
            _usdc("0x0b2C639c533813f4Aa9D7837CAf62653d097Ff85", None, None), 2.0, 1),
    # OP Sepolia: [circle] address, domain read from the token.
    Network(11155420, None, "OP Sepolia", True,
            _usdc("0x5fd84259d66Cd46123540766Be93DFE6D43130D7", None, None), 2.0, 1),
    # Ethereum: [py-v1] name "ethereum"; [py-assets] "USD Coin"/"2".
    Network(1, "ethereum", "Ethereum", False,
            _usdc("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"), 12.0, 2),
    # Sepolia: [circle] address, domain read from the token.
    Network(11155111, None, "Sepolia", True,
            _usdc("0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238", None, None), 12.0, 1),
    # --- the others the official SDKs list ([py-v1] names, [py-assets]/[ts-legacy] tokens) -----
    # Block times in this section are approximate figures from the chains' own docs, not
    # checked on-chain; they only shape default waits, never correctness.
    # Abstract: [ts-legacy] "Bridged USDC" (version "2").
    Network(2741, "abstract", "Abstract", False,
            _usdc("0x84A71ccD554Cc1b02749b35d22F684CC8ec987e1", "Bridged USDC"), 1.0, 1),
    Network(11124, "abstract-testnet", "Abstract Testnet", True,
            _usdc("0xe4C7fBB0a626ed208021ccabA6Be1566905E2dFc", "Bridged USDC"), 1.0, 1),
    # IoTeX: [ts-legacy] "Bridged USDC".
    Network(4689, "iotex", "IoTeX", False,
            _usdc("0xcdf79194c6c285077a58da47641d4dbe51f63542", "Bridged USDC"), 5.0, 1),
    # Sei: [py-assets] "USDC"/"2".
    Network(1329, "sei", "Sei", False,
            _usdc("0xe15fC38F6D8c56aF07bbCBe3BAf5708A2Bf42392", "USDC"), 0.4, 1),
    Network(1328, "sei-testnet", "Sei Testnet", True,
            _usdc("0x4fCF1784B31630811181f670Aea7A7bEF803eaED", "USDC"), 0.4, 1),
    # peaq: [ts-legacy] "USDC".
    Network(3338, "peaq", "peaq", False,
            _usdc("0xbbA60da06c2c5424f03f7434542280FCAd453d10", "USDC"), 6.0, 1),
    # Story, EDU Chain, SKALE Base Sepolia: [py-v1] names; no USDC in the SDK tables.
    Network(1513, "story", "Story", False, None, 2.0, 1),
    Network(656476, "educhain", "EDU Chain", True, None, 2.0, 1),
    Network(1444673419, "skale-base-sepolia", "SKALE Base Sepolia", True, None, 1.0, 1),
    # MegaETH: [py-v1]; its default asset (MegaUSD) is Permit2-only, so no EIP-3009 USDC here.
    Network(4326, "megaeth", "MegaETH", False, None, 1.0, 1),
    # Monad: [py-assets] "USDC"/"2".
    Network(143, "monad", "Monad", False,
            _usdc("0x754704Bc059F8C67012fEd69BC8A327a5aafb603", "USDC"), 0.4, 1),
    Network(10143, "monad-testnet", "Monad Testnet", True,
            _usdc("0x534b2f3A21130d7a60830c2Df862319e593943A3", "USDC"), 0.4, 1),
    # Stable: [py-v1]; its default asset is USDT0 (listed by the SDK), not USDC.
    Network(988, "stable", "Stable", False, None, 1.0, 1),
    Network(2201, "stable-testnet", "Stable Testnet", True, None, 1.0, 1),
    # Celo: [py-assets] "USDC"/"2".
    Network(42220, "celo", "Celo", False,
            _usdc("0xcebA9300f2b948710d2653dD7B07f33A8B32118C", "USDC"), 1.0, 1),
    Network(11142220, None, "Celo Sepolia", True,
            _usdc("0x01C5C0122039549AD1493B8220cABEdD739BC44E", "USDC"), 1.0, 1),
    # Flare: [py-v1] name; default asset USD₮0 (not USDC).
    Network(14, "flare", "Flare", False, None, 1.8, 1),
    # XDC: [py-assets] "USDC"/"2" (Bridged USDC Standard).
    Network(50, None, "XDC Network", False,
            _usdc("0xfA2958CB79b0491CC627c1557F441eF849Ca8eb1", "USDC"), 2.0, 1),
    Network(51, None, "XDC Apothem", True,
            _usdc("0xb5AB69F7bBada22B28e79C8FFAECe55eF1c771D4", "USDC"), 2.0, 1),
    # Arc: [py-assets] "USDC"/"2".
    Network(5042, None, "Arc", False,
            _usdc("0x3600000000000000000000000000000000000000", "USDC"), 1.0, 1),
    Network(5042002, None, "Arc Testnet", True,
            _usdc("0x3600000000000000000000000000000000000000", "USDC"), 1.0, 1),
    # Our dev chain (anvil's default chain id). No USDC: the dev token is deployed per run.
    Network(31337, "localhost", "Dev chain (anvil)", True, None, 0.0, 1),
]  # fmt: skip

NETWORKS: dict[str, Network] = {n.caip2: n for n in _ALL}
V1_NAMES: dict[str, int] = {n.v1_name: n.chain_id for n in _ALL if n.v1_name}
_BY_CHAIN_ID = {n.chain_id: n for n in _ALL}

#: USDC per network (EIP-712 domain as deployed, where an official SDK states it).
USDC: dict[str, KnownAsset] = {n.caip2: n.usdc for n in _ALL if n.usdc is not None}


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
    known = _BY_CHAIN_ID.get(chain_id)
    return known.v1_name if known and known.v1_name else f"eip155:{chain_id}"


def lookup(network: str) -> Network | None:
    """The registry entry for a CAIP-2 id or v1 name, or None for a chain we know nothing of
    (any ``eip155:<id>`` is still usable, with its token configured explicitly)."""
    return _BY_CHAIN_ID.get(chain_id_of(network))


def default_confirmations(network: str) -> int:
    known = lookup(network)
    return known.confirmations if known else 1
