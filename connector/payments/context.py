"""What a payment service needs to know about its connection, loaded once per operation.

Secrets (wallet key, facilitator API key) are decrypted lazily, only by the code path that signs
or calls the facilitator, and never stored on the context's public fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.policy.rules import SpendingPolicy
from connector.x402.exact_evm import SigningKey


@dataclass
class ConnectionContext:
    id: str
    network: str  # CAIP-2
    rpc_url: str
    facilitator_url: str
    wallet_address: str
    capture_default: str
    policy: SpendingPolicy
    _account: Callable[[], SigningKey] = field(repr=False)
    _api_key: Callable[[], str | None] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def account(self) -> SigningKey:
        return self._account()

    def api_key(self) -> str | None:
        return self._api_key()
