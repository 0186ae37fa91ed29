"""A persisted dev chain (``x402c dev`` keeps its chain) saved before the escrow existed gets the
escrow stack when it comes back; a fresh one has it from the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.chain import ChainClient
from connector.devchain.deploy import start_devchain
from connector.devchain.escrow import escrow_installed
from connector.x402 import auth_capture as ac

pytestmark = pytest.mark.chain


def test_a_resumed_chain_without_the_escrow_gets_it(tmp_path: Path) -> None:
    state, info_file = tmp_path / "chain.json", tmp_path / "devchain.json"
    node, _ = start_devchain(fund_count=1, state_file=info_file, chain_state=state)
    try:
        client = ChainClient(node.rpc_url)
        assert escrow_installed(client)
        for d in ac.DEPLOYMENTS:  # as saved by a connector version without the escrow
            client.rpc("anvil_setCode", [d.escrow, "0x"])
        assert not escrow_installed(client)
        client.close()
    finally:
        node.stop()  # anvil dumps its state on exit
    node, _ = start_devchain(fund_count=1, state_file=info_file, chain_state=state)
    try:
        client = ChainClient(node.rpc_url)
        assert escrow_installed(client)
        client.close()
    finally:
        node.stop()
