"""Interop with the official TypeScript ``auth-capture`` client (``@x402/evm`` 2.27, under Node).

The TS client picks its own salt and clock, so the test rebuilds the terms from what it sent
(payer, salt, validBefore = preApprovalExpiry) and checks that our nonce derivation, our digest
and our escrow agree with it — then lets our escrow authorize with its signature on anvil.

Needs Node and the pinned ``@x402/evm`` + ``viem``: ``scripts/setup_ts_interop.sh`` installs them
into ``.devtools/ts-interop``; or point ``X402C_X402_EVM_CLIENT`` (the client's
``dist/cjs/auth-capture/client/index.js``) and ``X402C_TS_NODE_PATH`` (a ``node_modules`` with
viem) elsewhere. Skipped, with the reason, when absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.chain.auth_capture import EscrowClient
from connector.devchain.deploy import DevChainInfo
from connector.x402 import auth_capture as ac
from connector.x402 import exact_evm
from tests.fixtures.escrow import requirement, wall_now

pytestmark = pytest.mark.chain
HELPER = Path(__file__).parents[1] / "helpers" / "ts_auth_capture_sign.js"
_LOCAL = Path(__file__).parents[2] / ".devtools" / "ts-interop" / "node_modules"
CLIENT = Path(
    os.environ.get(
        "X402C_X402_EVM_CLIENT",
        str(_LOCAL / "@x402" / "evm" / "dist" / "cjs" / "auth-capture" / "client" / "index.js"),
    )
)
NODE_PATH = Path(os.environ.get("X402C_TS_NODE_PATH", str(_LOCAL)))


def ts_sign(account: LocalAccount, wire_requirement: dict[str, Any]) -> dict[str, Any]:
    if shutil.which("node") is None or not CLIENT.is_file() or not (NODE_PATH / "viem").is_dir():
        pytest.skip("TypeScript auth-capture client or viem not available (see module docstring)")
    stdin = json.dumps(
        {
            "clientPath": str(CLIENT),
            "key": "0x" + bytes(account.key).hex(),
            "requirements": wire_requirement,
        }
    )
    done = subprocess.run(
        ["node", str(HELPER)],
        input=stdin.encode(),
        capture_output=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(NODE_PATH)},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[:2000]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("deployment", ac.DEPLOYMENTS, ids=lambda d: d.version)
def test_ts_client_signature_is_accepted_by_our_hashing_and_our_escrow(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    deployment: ac.Deployment,
) -> None:
    payer, operator, receiver, fees = accounts[1], accounts[2], accounts[3], accounts[4]
    now = wall_now()
    req = requirement(
        chain,
        operator=operator.address,
        pay_to=receiver.address,
        now=now,
        fee_recipient=fees.address,
        max_fee_bps=250,
        deployment=deployment,
    )
    out = ts_sign(payer, req.to_v2())
    assert out["scheme"] in ac.SCHEME_ALIASES
    client_payload = ac.parse_client_payload(out["payload"])
    auth = client_payload.authorization
    assert auth.to == deployment.eip3009_collector
    assert auth.from_ == payer.address and auth.value == req.amount and auth.valid_after == 0

    extra = ac.parse_extra(req.extra)
    info = ac.terms_for(
        req,
        extra,
        payer=auth.from_,
        salt=client_payload.salt,
        pre_approval_expiry=auth.valid_before,
    )
    assert ac.payer_agnostic_nonce(info, chain_id=chain.chain_id, escrow=deployment.escrow) == (
        auth.nonce
    )
    digest = ac.receive_digest(
        auth,
        token_name=chain.token_name,
        token_version=chain.token_version,
        chain_id=chain.chain_id,
        asset=chain.token,
    )
    assert exact_evm.recover_signer(digest, client_payload.signature) == payer.address

    escrow = EscrowClient(chain_client, deployment)
    before = chain_client.token_balance(chain.token, payer.address)
    data = ac.authorize_data(
        info, req.amount, deployment.eip3009_collector, client_payload.signature
    )
    assert escrow.execute(operator, data).status == 1
    assert chain_client.token_balance(chain.token, payer.address) == before - req.amount
    assert escrow.state(info) == ac.EscrowState(True, req.amount, 0)


def test_ts_and_python_clients_derive_the_same_nonce_for_the_same_salt(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    payer = accounts[1]
    now = wall_now()
    req = requirement(chain, operator=accounts[2].address, pay_to=accounts[3].address, now=now)
    ts = ac.parse_client_payload(ts_sign(payer, req.to_v2())["payload"])
    # sign with the TS client's salt and clock: our whole payload must be byte-identical
    ours, _ = ac.sign_auth_capture(
        payer, req, now=ts.authorization.valid_before - req.max_timeout_seconds, salt=ts.salt
    )
    assert ours.authorization == ts.authorization
    assert ours.signature == ts.signature  # RFC 6979: same key and digest → same signature


def test_ts_client_payload_settles_through_our_facilitator(
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    facilitator_url: str,
) -> None:
    """The TS client's payload as a resource server forwards it (no ``type``, no ``paymentInfo``):
    our facilitator rebuilds the terms, verifies and authorizes into the escrow."""
    import httpx

    payer, receiver = accounts[1], accounts[3]
    operator = accounts[19]  # the session facilitator's gas key
    now = wall_now()
    req = requirement(chain, operator=operator.address, pay_to=receiver.address, now=now)
    out = ts_sign(payer, req.to_v2())
    body = {
        "paymentPayload": {"x402Version": 2, "accepted": req.to_v2(), "payload": out["payload"]},
        "paymentRequirements": req.to_v2(),
    }
    verdict = httpx.post(f"{facilitator_url}/verify", json=body, timeout=30).json()
    assert verdict == {"isValid": True, "payer": payer.address}
    before = chain_client.token_balance(chain.token, payer.address)
    settled = httpx.post(f"{facilitator_url}/settle", json=body, timeout=60).json()
    assert settled["success"] is True and settled["operation"] == "authorize", settled
    assert chain_client.token_balance(chain.token, payer.address) == before - req.amount
    info = ac.payment_info_from_wire(settled["paymentInfo"])
    assert EscrowClient(chain_client).state(info) == ac.EscrowState(True, req.amount, 0)
