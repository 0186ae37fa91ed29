"""`x402c facilitator --config file`: one process serving two networks (two anvils) for v1 and v2,
with RPC failover, API-key authentication and the gas alarm; plus the config's safety rules."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.devchain.anvil import Anvil
from connector.devchain.deploy import dev_accounts, setup_token_at
from connector.facilitator.config import FacilitatorConfig, load_config
from connector.x402 import exact_evm
from connector.x402.codec import build_payment_payload
from connector.x402.networks import USDC
from connector.x402.requirement import Requirement
from tests.fixtures.servers import free_port

pytestmark = [pytest.mark.chain]

API_KEY = "fac-key-0123456789abcdef"
NETWORKS = {"eip155:84532": "base-sepolia", "eip155:80002": "polygon-amoy"}


@pytest.fixture(scope="module")
def chains() -> Iterator[dict[str, ChainClient]]:
    payer = dev_accounts(2)[1]
    nodes = [Anvil(chain_id=84532).start(), Anvil(chain_id=80002).start()]
    clients: dict[str, ChainClient] = {}
    try:
        for node, network in zip(nodes, NETWORKS, strict=True):
            client = ChainClient(node.rpc_url)
            usdc = USDC[network]
            assert usdc.name and usdc.version
            setup_token_at(
                client, usdc.address, name=usdc.name, version=usdc.version,
                fund=[payer.address], amount=1_000_000,
            )  # fmt: skip
            clients[network] = client
        yield clients
    finally:
        for client in clients.values():
            client.close()
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def facilitator(
    chains: dict[str, ChainClient], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("facilitator")
    key_file = folder / "signer.key"
    key_file.write_text("0x" + dev_accounts(20)[19].key.hex())
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the first RPC URL fails over
    port = free_port()
    config = folder / "facilitator.toml"
    config.write_text(
        f"""
port = {port}
api_keys = ["{API_KEY}"]
gas_check_interval_s = 3600

[signer]
key_file = "{key_file}"

[[networks]]
network = "base-sepolia"
rpc_urls = ["{dead}", "{chains["eip155:84532"].rpc_url}"]

[[networks]]
network = "eip155:80002"
rpc_urls = ["{chains["eip155:80002"].rpc_url}"]
min_gas_balance_wei = {10**30}
"""
    )
    log = (folder / "facilitator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "facilitator", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (folder / "facilitator.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "facilitator did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _body(payer: LocalAccount, network: str, version: int, amount: int) -> dict[str, Any]:
    usdc = USDC[network]
    requirement = Requirement(
        scheme="exact", network=network, amount=amount, asset=usdc.address,
        pay_to="0x000000000000000000000000000000000000dEaD", max_timeout_seconds=300,
        extra={"name": usdc.name, "version": usdc.version},
        resource="http://127.0.0.1/r", description="", mime_type="application/json",
    )  # fmt: skip
    signed = exact_evm.sign_exact(payer, requirement)
    return {
        "x402Version": version,
        "paymentPayload": build_payment_payload(signed.payload, requirement, version),
        "paymentRequirements": requirement.to_wire(version),
    }


def test_supported_lists_every_version_and_network_with_v1_names(facilitator: str) -> None:
    supported = httpx.get(f"{facilitator}/supported", timeout=10).json()
    kinds = {(k["x402Version"], k["scheme"], k["network"]) for k in supported["kinds"]}
    assert kinds == {
        (2, "exact", "eip155:84532"), (1, "exact", "base-sepolia"),
        (2, "exact", "eip155:80002"), (1, "exact", "polygon-amoy"),
    }  # fmt: skip
    assert supported["signers"]["eip155:*"] == [dev_accounts(20)[19].address]


def test_settles_v1_and_v2_on_both_networks_and_names_the_network_per_version(
    facilitator: str, chains: dict[str, ChainClient]
) -> None:
    payer = dev_accounts(2)[1]
    auth = {"authorization": f"Bearer {API_KEY}"}
    dead = "0x000000000000000000000000000000000000dEaD"
    for network, v1_name in NETWORKS.items():
        client, token = chains[network], USDC[network].address
        before = client.token_balance(token, dead)
        for version, amount in ((2, 1_000), (1, 2_000)):
            body = _body(payer, network, version, amount)
            verdict = httpx.post(f"{facilitator}/verify", json=body, headers=auth, timeout=30)
            assert verdict.json()["isValid"] is True, verdict.text
            answer = httpx.post(f"{facilitator}/settle", json=body, headers=auth, timeout=30)
            result = answer.json()
            assert result["success"] is True, result
            assert result["network"] == (v1_name if version == 1 else network)
            receipt = client.get_receipt(result["transaction"])
            assert receipt is not None and receipt.status == 1
        assert client.token_balance(token, dead) == before + 3_000


def test_api_key_guards_verify_and_settle_only(facilitator: str) -> None:
    body = _body(dev_accounts(2)[1], "eip155:84532", 2, 1)
    for path in ("/verify", "/settle"):
        bare = httpx.post(f"{facilitator}{path}", json=body, timeout=10)
        wrong = httpx.post(
            f"{facilitator}{path}", json=body, headers={"authorization": "Bearer nope"}, timeout=10
        )
        assert bare.status_code == wrong.status_code == 401
        assert bare.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{facilitator}/supported", timeout=10).status_code == 200


def test_an_unserved_network_is_refused_not_crashed(facilitator: str) -> None:
    body = _body(Account.create(), "eip155:84532", 2, 1)
    body["paymentRequirements"]["network"] = "eip155:1"
    body["paymentPayload"]["accepted"]["network"] = "eip155:1"
    auth = {"authorization": f"Bearer {API_KEY}"}
    answer = httpx.post(f"{facilitator}/settle", json=body, headers=auth, timeout=10).json()
    assert answer["success"] is False and answer["errorReason"] == "unsupported_network"
    assert answer["transaction"] == ""


def test_low_gas_is_a_warning_and_a_metric(facilitator: str) -> None:
    metrics = httpx.get(f"{facilitator}/metrics", timeout=10).text
    low = [line for line in metrics.splitlines() if line.startswith("x402c_facilitator_gas_low")]
    assert any('network="eip155:80002"' in line and not line.endswith(" 0.0") for line in low)
    assert not any('network="eip155:84532"' in line and not line.endswith(" 0.0") for line in low)
    assert 'x402c_facilitator_gas_wei{network="eip155:84532"}' in metrics


def _config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "networks": [{"network": "base-sepolia", "rpc_urls": ["http://127.0.0.1:1"]}],
        "signer": {"key_file": "/nonexistent"},
    }
    data.update(overrides)
    return data


def test_config_rules_refuse_unsafe_or_ambiguous_setups(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="refused outside dev"):
        FacilitatorConfig(**_config(signer={"dev_mnemonic_index": 19}))
    FacilitatorConfig(**_config(signer={"dev_mnemonic_index": 19}, mode="dev"))
    with pytest.raises(ValidationError, match="exactly one signer source"):
        FacilitatorConfig(**_config(signer={"key_file": "/a", "dev_mnemonic_index": 1}))
    with pytest.raises(ValidationError, match="has no registry USDC"):
        FacilitatorConfig(**_config(networks=[{"network": "eip155:999", "rpc_urls": ["http://x"]}]))
    with pytest.raises(ValidationError, match="listed once"):
        twice = {"network": "eip155:84532", "rpc_urls": ["http://x"]}
        FacilitatorConfig(**_config(networks=[twice, {**twice, "network": "base-sepolia"}]))
    with pytest.raises(ValidationError, match="at least 16"):
        FacilitatorConfig(**_config(api_keys=["short"]))
    path = tmp_path / "f.json"
    path.write_text('{"networks": [{"network": "polygon-amoy", "rpc_urls": ["http://n"]}], '
                    '"signer": {"key_file": "/k"}}')  # fmt: skip
    loaded = load_config(path)
    assert loaded.networks[0].network == "eip155:80002"
    assert loaded.networks[0].tokens == [USDC["eip155:80002"].address]
    assert loaded.networks[0].required_confirmations == 1


def test_a_sealed_signer_key_opens_only_with_the_vault() -> None:
    from connector.errors import ValidationFailed
    from connector.facilitator.config import VAULT_FIELD, VAULT_OWNER
    from connector.vault.envelope import MasterKeyRing, Vault

    vault = Vault(MasterKeyRing.parse(MasterKeyRing.generate_spec("t1")))
    account = Account.create()
    token = vault.encrypt("0x" + account.key.hex(), owner=VAULT_OWNER, field=VAULT_FIELD)
    cfg = FacilitatorConfig(**_config(signer={"vault_token": token}))
    assert cfg.signer_account(vault).address == account.address
    with pytest.raises(ValidationFailed):
        cfg.signer_account(None)
    other = Vault(MasterKeyRing.parse(MasterKeyRing.generate_spec("t2")))
    with pytest.raises(Exception, match="cannot be decrypted"):
        cfg.signer_account(other)


def test_config_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "X402C_FACILITATOR_NETWORKS",
        '[{"network": "base-sepolia", "rpc_urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"]}]',
    )
    monkeypatch.setenv("X402C_FACILITATOR_SIGNER", '{"key_file": "/run/secrets/k"}')
    monkeypatch.setenv("X402C_FACILITATOR_API_KEYS", f'["{API_KEY}"]')
    monkeypatch.setenv("X402C_FACILITATOR_PORT", "9999")
    cfg = load_config(None)
    assert cfg.port == 9999 and cfg.mode == "production"
    assert cfg.networks[0].network == "eip155:84532" and len(cfg.networks[0].rpc_urls) == 2
    assert [k.get_secret_value() for k in cfg.api_keys] == [API_KEY]
    assert str(cfg.signer.key_file) == "/run/secrets/k"


@pytest.mark.parametrize(("setting", "batch"), [(None, 20), (5, 5), (1, None)])
def test_concurrent_settles_share_rpc_batches_up_to_rpc_max_batch(
    setting: int | None, batch: int | None
) -> None:
    from connector.facilitator.multi import _network_facilitator

    values: dict[str, Any] = {"network": "base-sepolia", "rpc_urls": ["http://127.0.0.1:1"]}
    if setting is not None:
        values["rpc_max_batch"] = setting
    cfg = FacilitatorConfig.model_validate(
        {"signer": {"key_file": "/run/secrets/k"}, "networks": [values]}
    )
    client = _network_facilitator(cfg.networks[0], Account.create(), cfg).chain
    try:
        if batch is None:  # 1: every call alone, no combining
            assert client.combiner is None
        else:
            assert client.combiner is not None and client.combiner._max_calls == batch
    finally:
        client.close()
