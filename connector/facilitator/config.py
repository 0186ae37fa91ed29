"""Configuration of ``x402c facilitator``: networks, tokens, signer key, API keys, gas alarms.

Read from a TOML or JSON file (``--config``) and/or ``X402C_FACILITATOR_*`` environment
variables (values in the file win; nested values in the environment are JSON, e.g.
``X402C_FACILITATOR_NETWORKS='[{"network": "base-sepolia", "rpc_urls": ["https://…"]}]'``).

The signer key comes from a key file (hex, mode 0600 recommended) or a vault token (the key
encrypted under the connector's master keys, see ``x402c facilitator seal-key``); a dev-mnemonic
index is accepted only in ``dev`` mode, so a production facilitator can never run on a public
test key by accident.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from connector.errors import ValidationFailed
from connector.x402.errors import UnknownNetwork
from connector.x402.fields import checksum
from connector.x402.networks import USDC, default_confirmations, lookup, to_caip2

#: Vault binding of a sealed signer key (owner, field): a token for anything else won't open.
VAULT_OWNER, VAULT_FIELD = "facilitator", "signer_key"


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: str = Field(description="CAIP-2 id or v1 name; stored as CAIP-2.")
    rpc_urls: list[str] = Field(min_length=1, max_length=8, description="In failover order.")
    tokens: list[str] | None = Field(
        default=None, description="EIP-3009 tokens accepted; default: the network's USDC."
    )
    confirmations: int | None = Field(default=None, ge=1, le=100)
    min_gas_balance_wei: int = Field(
        default=5 * 10**15, ge=0, description="Below this the signer is reported as low on gas."
    )
    rpc_max_batch: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Most calls in one JSON-RPC batch: concurrent settles share round trips to "
        "the node (1 sends every call alone; set it to the provider's batch limit).",
    )

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        try:
            return to_caip2(value)
        except UnknownNetwork as exc:
            raise ValueError(exc.detail) from exc

    @field_validator("rpc_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value

    @model_validator(mode="after")
    def _tokens(self) -> NetworkConfig:
        if self.tokens is None:
            known = USDC.get(self.network)
            if known is None:
                raise ValueError(f"{self.network} has no registry USDC: list its `tokens`")
            self.tokens = [known.address]
        self.tokens = [checksum(t) for t in self.tokens]
        return self

    @property
    def required_confirmations(self) -> int:
        return self.confirmations or default_confirmations(self.network)

    @property
    def title(self) -> str:
        known = lookup(self.network)
        return known.title if known else self.network


class SignerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_file: Path | None = Field(default=None, description="File holding the hex private key.")
    vault_token: SecretStr | None = Field(
        default=None, description="The key sealed by `x402c facilitator seal-key`."
    )
    vault_token_file: Path | None = None
    dev_mnemonic_index: int | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _exactly_one(self) -> SignerConfig:
        given = [
            name
            for name in ("key_file", "vault_token", "vault_token_file", "dev_mnemonic_index")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one signer source: key_file, vault_token(_file) or "
                f"dev_mnemonic_index (got {given or 'none'})"
            )
        return self


class FacilitatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="X402C_FACILITATOR_", extra="forbid")

    mode: Literal["dev", "production"] = "production"
    host: str = "127.0.0.1"
    port: int = Field(default=8403, ge=1, le=65535)
    networks: list[NetworkConfig] = Field(min_length=1, max_length=64)
    signer: SignerConfig
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="If any, /verify and /settle need `Bearer <key>`."
    )
    gas_check_interval_s: float = Field(default=60.0, ge=1.0)
    receipt_timeout_s: float = Field(default=10.0, gt=0)
    max_in_flight: int = Field(default=64, ge=1, le=4096)

    @model_validator(mode="after")
    def _rules(self) -> FacilitatorConfig:
        if self.signer.dev_mnemonic_index is not None and self.mode != "dev":
            raise ValueError("signer.dev_mnemonic_index (a public test key) is refused outside dev")
        seen = [n.network for n in self.networks]
        if len(seen) != len(set(seen)):
            raise ValueError("each network may be listed once")
        for key in self.api_keys:
            if len(key.get_secret_value()) < 16:
                raise ValueError("API keys must be at least 16 characters")
        return self

    def signer_account(self, vault: Any | None = None) -> LocalAccount:
        """The gas key. ``vault`` (a :class:`~connector.vault.Vault`) opens a sealed key."""
        signer = self.signer
        if signer.dev_mnemonic_index is not None:
            from connector.devchain.deploy import dev_accounts

            return dev_accounts(signer.dev_mnemonic_index + 1)[signer.dev_mnemonic_index]
        if signer.key_file is not None:
            return _account(signer.key_file.read_text().strip(), str(signer.key_file))
        token = (
            signer.vault_token.get_secret_value()
            if signer.vault_token is not None
            else Path(str(signer.vault_token_file)).read_text().strip()
        )
        if vault is None:
            raise ValidationFailed("a sealed signer key needs the vault's master keys")
        return _account(vault.decrypt(token, owner=VAULT_OWNER, field=VAULT_FIELD), "vault token")


def _account(key: str, where: str) -> LocalAccount:
    from connector.logs import register_secret

    try:
        account: LocalAccount = Account.from_key(key)
    except (ValueError, TypeError) as exc:
        raise ValidationFailed(f"signer key from {where} is not a valid private key") from exc
    register_secret(key)
    return account


def load_config(path: Path | None = None) -> FacilitatorConfig:
    """From ``path`` (``.toml`` or ``.json``) plus the environment, or the environment alone."""
    data: dict[str, Any] = {}
    if path is not None:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if not isinstance(data, dict):
            raise ValidationFailed(f"{path} must hold an object")
    return FacilitatorConfig(**data)
