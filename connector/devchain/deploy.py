"""Deploy DevUSD and fund accounts: the dev chain's one-call setup.

The token's EIP-712 domain is ("Dev USD", "2"), deliberately not "USD Coin", and it lives on
chain id 31337 at whatever address the deployment gives — never a real USDC address.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from connector.chain import abi
from connector.chain.client import ChainClient, TransactionReverted
from connector.devchain.anvil import DEV_CHAIN_ID, DEV_MNEMONIC, Anvil
from connector.devchain.escrow import escrow_installed, install_auth_capture

ARTIFACT = Path(__file__).parent / "artifacts" / "DevUSD.json"
TOKEN_NAME = "Dev USD"
TOKEN_SYMBOL = "dUSD"
TOKEN_VERSION = "2"
DEV_NETWORK = f"eip155:{DEV_CHAIN_ID}"


@lru_cache(maxsize=1)
def load_artifact() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ARTIFACT.read_text())
    return data


def dev_accounts(count: int = 20) -> list[LocalAccount]:
    """anvil's accounts for the default mnemonic (public test keys; never hold real value)."""
    Account.enable_unaudited_hdwallet_features()
    return [
        Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        for i in range(count)
    ]


@dataclass
class DevChainInfo:
    rpc_url: str
    chain_id: int
    network: str
    token: str
    token_name: str
    token_version: str
    decimals: int
    minter: str
    funded: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> DevChainInfo:
        return cls(**json.loads(path.read_text()))


def deploy_dev_token(
    client: ChainClient,
    deployer: LocalAccount,
    *,
    name: str = TOKEN_NAME,
    symbol: str = TOKEN_SYMBOL,
    version: str = TOKEN_VERSION,
) -> str:
    args = encode(["string", "string", "string"], [name, symbol, version]).hex()
    return client.deploy(deployer, load_artifact()["bytecode"] + args)


def mint(client: ChainClient, token: str, minter: LocalAccount, to: str, amount: int) -> str:
    data = abi.call_data(abi.MINT, ["address", "uint256"], [to, amount])
    tx = client.send_transaction(minter, token, data, gas=100_000)
    receipt = client.wait_for_receipt(tx)
    if receipt.status != 1:
        raise TransactionReverted(f"mint to {to} reverted", tx_hash=tx)
    return tx


def setup_dev_token(
    client: ChainClient,
    *,
    fund: list[str] | None = None,
    amount: int = 1_000_000 * 10**6,
    minter: LocalAccount | None = None,
) -> DevChainInfo:
    """Deploy DevUSD with account 0 as minter and mint ``amount`` to every address in ``fund``."""
    minter = minter or dev_accounts(1)[0]
    token = deploy_dev_token(client, minter)
    hashes = [
        client.send_transaction(
            minter, token, abi.call_data(abi.MINT, ["address", "uint256"], [a, amount]), gas=100_000
        )
        for a in (fund or [])
    ]
    for tx in hashes:
        if client.wait_for_receipt(tx).status != 1:
            raise TransactionReverted("funding mint reverted", tx_hash=tx)
    return _chain_info(client, token, TOKEN_NAME, TOKEN_VERSION, minter, fund)


def _chain_info(
    client: ChainClient,
    token: str,
    name: str,
    version: str,
    minter: LocalAccount,
    fund: list[str] | None,
) -> DevChainInfo:
    """What a deployment tells its users: one shape whether the token was deployed fresh or
    placed at a fixed address."""
    chain_id = client.chain_id()
    return DevChainInfo(
        rpc_url=client.rpc_url,
        chain_id=chain_id,
        network=f"eip155:{chain_id}",
        token=token,
        token_name=name,
        token_version=version,
        decimals=6,
        minter=minter.address,
        funded=list(fund or []),
    )


#: DevUSD's storage slots 0..4: name, symbol, version, totalSupply, minter (short strings live
#: in their slot). Balances (slot 5 on) are minted afresh at the new address.
_TOKEN_HEADER_SLOTS = 5


def setup_token_at(
    client: ChainClient,
    address: str,
    *,
    name: str,
    version: str,
    symbol: str = "USDC",
    fund: list[str] | None = None,
    amount: int = 1_000_000 * 10**6,
    minter: LocalAccount | None = None,
) -> DevChainInfo:
    """Put a DevUSD token at a fixed ``address`` on an anvil node (``anvil_setCode`` plus its
    storage), e.g. the canonical USDC address of the chain id anvil pretends to be, so that a
    connection configured only by network name finds "its USDC" offline. Test/dev nodes only:
    the anvil_* methods exist nowhere else."""
    minter = minter or dev_accounts(1)[0]
    source = deploy_dev_token(client, minter, name=name, symbol=symbol, version=version)
    target = to_checksum_address(address)
    client.rpc("anvil_setCode", [target, client.rpc("eth_getCode", [source, "latest"])])
    for slot in range(_TOKEN_HEADER_SLOTS):
        value = client.rpc("eth_getStorageAt", [source, hex(slot), "latest"])
        client.rpc("anvil_setStorageAt", [target, hex(slot), "0x" + value[2:].rjust(64, "0")])
    for account in fund or []:
        mint(client, target, minter, account, amount)
    return _chain_info(client, target, name, version, minter, fund)


def start_devchain(
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    fund_count: int = 10,
    state_file: Path | None = None,
    chain_state: Path | None = None,
) -> tuple[Anvil, DevChainInfo]:
    """Start anvil, deploy DevUSD, fund the first ``fund_count`` dev accounts and place the
    ``authCapture`` escrow stack at its canonical addresses.

    With ``chain_state`` the chain persists: anvil loads and dumps that file, and when both it and
    ``state_file`` exist from an earlier run the same chain comes back on the same port (unless
    ``port`` says otherwise) with the token where it was, so nothing is deployed again and stored
    connections keep working.
    """
    if chain_state is not None and state_file is not None and chain_state.exists():
        if state_file.exists():
            info = DevChainInfo.from_file(state_file)
            previous_port = int(info.rpc_url.rsplit(":", 1)[1])
            node = Anvil(
                host=host, port=port or previous_port, state_path=chain_state, state_interval_s=5
            ).start()
            client = ChainClient(node.rpc_url)
            try:
                if client.rpc("eth_getCode", [info.token, "latest"]) not in ("", "0x", None):
                    if not escrow_installed(client):  # a chain saved before the escrow existed
                        install_auth_capture(client, dev_accounts(1)[0])
                    info.rpc_url = node.rpc_url
                    state_file.write_text(info.to_json())
                    return node, info
            finally:
                client.close()
            node.stop()
        chain_state.unlink()  # a state without its deployment record: start the chain afresh
    node = Anvil(
        host=host,
        port=port,
        state_path=chain_state,
        state_interval_s=5 if chain_state is not None else None,
    ).start()
    client = ChainClient(node.rpc_url)
    try:
        info = setup_dev_token(client, fund=[a.address for a in dev_accounts(fund_count)])
        install_auth_capture(client, dev_accounts(1)[0])
    except Exception:
        node.stop()
        raise
    finally:
        client.close()
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(info.to_json())
    return node, info
