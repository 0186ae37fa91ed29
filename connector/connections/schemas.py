"""Input and public views of a connection. Secrets are write-only: views carry hints and flags."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connector.errors import ValidationFailed
from connector.policy.rules import SpendingPolicy
from connector.x402.errors import UnknownNetwork
from connector.x402.networks import to_caip2

_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_WHSEC = re.compile(r"^whsec_[A-Za-z0-9+/=]{24,}$")


def _check_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials; use the apiKey field")
    return value


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("network", check_fields=False)
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return to_caip2(value)
        except UnknownNetwork as exc:
            raise ValueError(exc.detail) from exc

    @field_validator("rpc_url", "facilitator_url", "webhook_url", check_fields=False)
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("private_key", check_fields=False)
    @classmethod
    def _private_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _KEY.match(value.get_secret_value()):
            raise ValueError("must be 32 bytes of hex (64 hex digits, optional 0x)")
        if value is not None and int(value.get_secret_value().removeprefix("0x"), 16) == 0:
            raise ValueError("is not a valid secp256k1 private key")
        return value

    @field_validator("webhook_secret", check_fields=False)
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _WHSEC.match(value.get_secret_value()):
            raise ValueError("must look like whsec_<base64, at least 24 chars>")
        return value

    @field_validator("asset", "pay_to", check_fields=False)
    @classmethod
    def _asset(cls, value: str | None) -> str | None:
        if value is not None and not _ADDRESS.match(value):
            raise ValueError("must be a 0x-address")
        return value


class ConnectionCreate(_Base):
    name: str = Field(min_length=1, max_length=120)
    network: str = Field(max_length=64, description="CAIP-2 (eip155:84532) or v1 name.")
    rpc_url: str = Field(max_length=2048)
    facilitator_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Default: the service's X402C_DEFAULT_FACILITATOR_URL, when configured.",
    )
    asset: str | None = Field(default=None, description="Default token; default: network USDC.")
    api_key: SecretStr | None = Field(
        default=None,
        max_length=4096,
        description="Write-only. Without `api_key_id`: a static bearer key. With it: the secret "
        "(PEM EC or base64 Ed25519) that signs a JWT per request, as CDP's facilitator expects.",
    )
    api_key_id: str | None = Field(
        default=None, max_length=256, description="Key id for per-request JWT auth (CDP-style)."
    )
    webhook_url: str | None = Field(default=None, max_length=2048)
    webhook_secret: SecretStr | None = Field(
        default=None, description="Write-only; generated (and shown once) when omitted."
    )
    private_key: SecretStr | None = Field(
        default=None,
        description="Write-only wallet key, needed to send, refund or forward. Omitted: a new "
        "wallet is generated, unless `pay_to` is given (then the connection is receive-only).",
    )
    pay_to: str | None = Field(
        default=None,
        description="Address that receives payments (default: the wallet's). With no "
        "`private_key` the connection holds no key and can only receive.",
    )
    capture_default: Literal["automatic", "manual"] = "automatic"
    policy: SpendingPolicy = Field(default_factory=SpendingPolicy)

    @model_validator(mode="after")
    def _jwt(self) -> ConnectionCreate:
        if self.api_key_id and self.api_key is None:
            raise ValueError("api_key_id needs api_key (the JWT signing secret)")
        try:
            _check_jwt_secret(self.api_key_id, self.api_key)
        except ValidationFailed as exc:
            raise ValueError(exc.detail) from exc
        return self


def _check_jwt_secret(key_id: str | None, secret: SecretStr | None) -> None:
    if key_id and secret is not None:
        from connector.facilitator.auth import parse_cdp_secret

        parse_cdp_secret(secret.get_secret_value())  # a ValidationFailed names the problem


class ConnectionUpdate(_Base):
    name: str | None = Field(default=None, min_length=1, max_length=120)
    network: str | None = Field(default=None, max_length=64)
    rpc_url: str | None = Field(default=None, max_length=2048)
    facilitator_url: str | None = Field(default=None, max_length=2048)
    asset: str | None = None
    api_key: SecretStr | None = Field(default=None, max_length=4096)
    api_key_id: str | None = Field(default=None, max_length=256)
    webhook_url: str | None = Field(default=None, max_length=2048)
    pay_to: str | None = None
    capture_default: Literal["automatic", "manual"] | None = None
    policy: SpendingPolicy | None = None

    @model_validator(mode="before")
    @classmethod
    def _required_fields_stay_set(cls, data: Any) -> Any:
        """Omitted means "unchanged"; an explicit null on a field every connection must have
        would store a row the API can no longer show (a 500 on every later read)."""
        if isinstance(data, dict):
            cleared = [k for k in ("name", "network", "rpc_url", "facilitator_url") if k in data]
            nulls = [k for k in cleared if data[k] is None]
            if nulls:
                raise ValueError(f"{', '.join(nulls)} cannot be null; omit a field to keep it")
        return data


class ConnectionView(BaseModel):
    id: str
    object: Literal["connection"] = "connection"
    name: str
    network: str
    rpc_url: str
    facilitator_url: str
    asset: str | None
    has_api_key: bool
    api_key_hint: str | None
    api_key_id: str | None = None
    facilitator_auth: Literal["none", "bearer", "jwt"] = "none"
    webhook_url: str | None
    has_webhook_secret: bool
    webhook_secret_rotating_until: str | None
    wallet_address: str | None = Field(description="None on a receive-only connection.")
    has_wallet_key: bool
    pay_to: str = Field(description="Where incoming payments go.")
    capture_default: str
    policy: dict[str, Any]
    created_at: str
    updated_at: str


class ConnectionCreated(ConnectionView):
    webhook_secret_once: str | None = Field(
        default=None,
        description="The generated webhook signing secret, shown only in this response.",
    )
