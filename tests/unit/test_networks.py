"""The network registry agrees with the official x402 SDK's own tables wherever both state a fact
(v1 names, chain ids, USDC addresses and EIP-712 domains), and is internally consistent."""

from __future__ import annotations

import pytest
from eth_utils.address import to_checksum_address

from connector.x402.errors import UnknownNetwork
from connector.x402.networks import (
    NETWORKS,
    USDC,
    V1_NAMES,
    chain_id_of,
    default_confirmations,
    lookup,
    to_caip2,
    to_v1_name,
)


def test_v1_names_and_chain_ids_match_the_python_sdk() -> None:
    from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS

    for name, chain_id in V1_NETWORK_CHAIN_IDS.items():
        assert chain_id_of(name) == chain_id, name
        assert to_v1_name(f"eip155:{chain_id}") == name
    assert set(V1_NAMES) - set(V1_NETWORK_CHAIN_IDS) == {"localhost"}


def test_usdc_entries_match_the_python_sdk_default_assets() -> None:
    from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

    compared = 0
    for network, entries in DEFAULT_ASSETS.items():
        sdk = next((e for e in entries if e["symbol"] == "USDC"), None)
        ours = USDC.get(network)
        if sdk is None or ours is None:
            continue
        compared += 1
        assert ours.address == to_checksum_address(sdk["asset"]), network
        assert (ours.name, ours.version, ours.decimals) == (
            sdk["name"], sdk["version"], sdk["decimals"]
        ), network  # fmt: skip
    assert compared >= 10


def test_the_networks_issue_14_names_are_all_there_with_usdc() -> None:
    for name in ("base", "base-sepolia", "polygon", "polygon-amoy", "avalanche",
                 "avalanche-fuji", "ethereum"):  # fmt: skip
        entry = lookup(name)
        assert entry is not None and entry.usdc is not None and entry.v1_name == name
    for caip2 in ("eip155:42161", "eip155:10", "eip155:11155111"):  # Arbitrum, OP, Sepolia
        entry = lookup(caip2)
        assert entry is not None and entry.usdc is not None and entry.v1_name is None
        assert to_v1_name(caip2) == caip2  # no v1 name: the v1 wire keeps the CAIP-2 id


def test_registry_is_consistent() -> None:
    for caip2, network in NETWORKS.items():
        assert caip2 == f"eip155:{network.chain_id}"
        assert network.confirmations >= 1 and network.block_time_s >= 0
        if network.usdc is not None:
            assert network.usdc.address == to_checksum_address(network.usdc.address)
            assert (network.usdc.name is None) == (network.usdc.version is None)
    assert len(V1_NAMES) == len(set(V1_NAMES.values()))
    assert default_confirmations("eip155:999999") == 1  # unknown chains still usable
    assert default_confirmations("polygon") == 5
    assert to_caip2("base-sepolia") == "eip155:84532"
    with pytest.raises(UnknownNetwork):
        chain_id_of("base-mainnet")
