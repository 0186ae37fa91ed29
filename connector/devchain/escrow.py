"""Put our dev-chain escrow stack at the canonical ``authCapture`` addresses.

Payers sign for the canonical escrow and collector addresses (they are inside the signed nonce
and the ERC-3009 payee), so on anvil our contracts must answer exactly there. The escrow keeps no
constructor state, so its runtime code is placed directly; each collector's escrow address is an
immutable (part of its runtime code), so a collector is deployed once per escrow address and its
runtime code copied to the canonical collector address. Real networks use the audited deployed
contracts; nothing of ours is ever deployed there.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount

from connector.chain.client import ChainClient
from connector.devchain.anvil import DevChainError
from connector.x402.auth_capture import DEPLOYMENTS, Deployment

ARTIFACT = Path(__file__).parent / "artifacts" / "AuthCaptureEscrow.json"


@lru_cache(maxsize=1)
def load_escrow_artifact() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ARTIFACT.read_text())
    return data


def _contract(name: str) -> dict[str, Any]:
    contract: dict[str, Any] = load_escrow_artifact()["contracts"][name]
    return contract


def _place(client: ChainClient, address: str, code: str) -> None:
    client.rpc("anvil_setCode", [address, code])
    if client.rpc("eth_getCode", [address, "latest"]).lower() != code.lower():
        raise DevChainError(f"anvil_setCode did not place code at {address}")


def _deploy_runtime(client: ChainClient, deployer: LocalAccount, name: str, escrow: str) -> str:
    """Runtime code of ``name`` constructed for ``escrow`` (deployed, then read back)."""
    args = encode(["address"], [escrow]).hex()
    address = client.deploy(deployer, _contract(name)["bytecode"] + args)
    return str(client.rpc("eth_getCode", [address, "latest"]))


def escrow_installed(
    client: ChainClient, deployments: tuple[Deployment, ...] = DEPLOYMENTS
) -> bool:
    """Whether every deployment's escrow has code (a persisted chain may predate it)."""
    return all(
        len(client.rpc("eth_getCode", [d.escrow, "latest"]) or "0x") > 2 for d in deployments
    )


def install_auth_capture(
    client: ChainClient,
    deployer: LocalAccount,
    deployments: tuple[Deployment, ...] = DEPLOYMENTS,
) -> list[Deployment]:
    """Escrow, EIP-3009 collector and operator refund collector at each deployment's canonical
    addresses (v1.0 and v1.1 by default). Permit2 is not installed."""
    escrow_code = _contract("AuthCaptureEscrow")["deployedBytecode"]
    for deployment in deployments:
        _place(client, deployment.escrow, escrow_code)
        for name, target in (
            ("ERC3009PaymentCollector", deployment.eip3009_collector),
            ("OperatorRefundCollector", deployment.operator_refund_collector),
        ):
            _place(client, target, _deploy_runtime(client, deployer, name, deployment.escrow))
    return list(deployments)
