"""The version-neutral payment requirement and its v1/v2 wire forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connector.x402 import fields as f
from connector.x402.networks import to_caip2, to_v1_name


@dataclass(frozen=True)
class Requirement:
    scheme: str
    network: str  # CAIP-2
    amount: int  # atomic units
    asset: str  # checksummed token address
    pay_to: str  # checksummed
    max_timeout_seconds: int
    extra: dict[str, Any] = field(default_factory=dict)
    # v1 carries these inside each requirement; v2 moves them to `resource`.
    resource: str | None = None
    description: str | None = None
    mime_type: str | None = None
    output_schema: dict[str, Any] | None = None

    @property
    def token_name(self) -> str | None:
        value = self.extra.get("name")
        return value if isinstance(value, str) else None

    @property
    def token_version(self) -> str | None:
        value = self.extra.get("version")
        return value if isinstance(value, str) else None

    def to_v2(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.network,
            "amount": str(self.amount),
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": dict(self.extra),
        }

    def to_v1(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "scheme": self.scheme,
            "network": to_v1_name(self.network),
            "maxAmountRequired": str(self.amount),
            "resource": self.resource or "",
            "description": self.description or "",
            "mimeType": self.mime_type or "application/json",
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "asset": self.asset,
            "extra": dict(self.extra),
        }
        if self.output_schema is not None:
            wire["outputSchema"] = self.output_schema
        return wire

    def to_wire(self, version: int) -> dict[str, Any]:
        return self.to_v1() if version == 1 else self.to_v2()

    def same_offer(self, other: Requirement) -> bool:
        """Equal in everything that decides what is paid (the v2 `accepted` match rule)."""
        return (
            self.scheme == other.scheme
            and self.network == other.network
            and self.amount == other.amount
            and self.asset.lower() == other.asset.lower()
            and self.pay_to.lower() == other.pay_to.lower()
            and self.max_timeout_seconds == other.max_timeout_seconds
        )


def requirement_from_wire(data: Any, version: int, where: str = "requirement") -> Requirement:
    d = f.obj(data, where)
    amount_key = "maxAmountRequired" if version == 1 else "amount"
    extra = f.optional_obj(d, "extra", where) or {}
    return Requirement(
        scheme=f.string(d, "scheme", where, max_len=32),
        network=to_caip2(f.string(d, "network", where, max_len=64)),
        amount=f.uint_string(d, amount_key, where),
        asset=f.address(d, "asset", where),
        pay_to=f.address(d, "payTo", where),
        max_timeout_seconds=f.positive_int(d, "maxTimeoutSeconds", where, default=60),
        extra=extra,
        resource=f.optional_string(d, "resource", where) if version == 1 else None,
        description=f.optional_string(d, "description", where) if version == 1 else None,
        mime_type=f.optional_string(d, "mimeType", where, max_len=256) if version == 1 else None,
        output_schema=f.optional_obj(d, "outputSchema", where) if version == 1 else None,
    )
