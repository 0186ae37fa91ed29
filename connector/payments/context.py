"""What a payment service needs to know about its connection, loaded once per operation.

Secrets (wallet key, facilitator API key) are decrypted lazily, only by the code path that signs
or calls the facilitator, and never stored on the context's public fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.facilitator.auth import FacilitatorCredentials
from connector.policy.rules import SpendingPolicy
from connector.x402.exact_evm import SigningKey


@dataclass
class ConnectionContext:
    id: str
    network: str  # CAIP-2
    rpc_url: str
    facilitator_url: str
    wallet_address: str | None  # None: receive-only connection (no key)
    capture_default: str
    policy: SpendingPolicy
    _account: Callable[[], SigningKey] = field(repr=False)
    _api_key: Callable[[], FacilitatorCredentials] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    pay_to: str | None = None  # receiving address when it is not the wallet's
    # The key of one of this connection's earlier (rotated-out) wallets, by address, if any.
    _archived: Callable[[str], SigningKey | None] = field(default=lambda _: None, repr=False)

    def account(self) -> SigningKey:
        """The wallet's signing key; raises ``WalletKeyMissing`` on a receive-only connection."""
        return self._account()

    @property
    def receiving_address(self) -> str:
        address = self.pay_to or self.wallet_address
        assert address is not None  # the connection rules keep one of them set
        return address

    def holds_key_for(self, address: str) -> bool:
        return self.wallet_address is not None and self.wallet_address.lower() == address.lower()

    def account_for(self, address: str, why: str) -> SigningKey:
        """The key that can move money out of ``address`` (a refund or an escrow release must
        be signed by the address that received the payment)."""
        from connector.errors import WalletKeyMissing

        if not self.holds_key_for(address):
            archived = self._archived(address) if address else None
            if archived is not None:  # money received before a wallet rotation
                return archived
            raise WalletKeyMissing(
                f"{why} must be signed by {address}, and this connection holds no key for it",
                connection_id=self.id,
                address=address,
            )
        return self._account()

    def api_key(self) -> FacilitatorCredentials:
        """None, a bearer key, or JWT credentials (see :mod:`connector.facilitator.auth`)."""
        return self._api_key()
