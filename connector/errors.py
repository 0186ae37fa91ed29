"""The connector's exception hierarchy.

Every error the domain raises on purpose is a :class:`ConnectorError` with a stable ``code``.
The API maps ``code`` to an RFC 9457 problem ``type`` and ``status`` to the HTTP status, so the
edge never needs to know which module raised what.
"""

from __future__ import annotations

from typing import Any


class ConnectorError(Exception):
    """Base of every deliberate error; ``code`` is stable and documented."""

    code: str = "internal_error"
    status: int = 500
    title: str = "Internal error"

    def __init__(self, detail: str, **context: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.context = context


class ValidationFailed(ConnectorError):
    """Input broke a rule; ``field`` names what to fix."""

    code = "validation_failed"
    status = 422
    title = "Validation failed"

    def __init__(self, detail: str, field: str | None = None, **context: Any) -> None:
        super().__init__(detail, field=field, **context)
        self.field = field


class NotFound(ConnectorError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(ConnectorError):
    """The request is valid but contradicts the current state (HTTP 409)."""

    code = "conflict"
    status = 409
    title = "Conflict"


class EscrowRefused(Conflict):
    """An on-chain escrow operation the escrow refuses (nothing held, a deadline passed, more
    than what is held or captured; for the payer's reclaim, the contract's simulation reverted
    with ``reason``, e.g. ``before_authorization_expiry`` or ``zero_authorization``): refused
    before anything is sent, so no money moves."""

    code = "escrow_refused"
    title = "The escrow operation is not possible"


class IllegalTransition(Conflict):
    """A payment was asked to move along an edge the state machine does not have."""

    code = "illegal_transition"
    title = "Illegal state transition"


class ConcurrentUpdate(Conflict):
    """Optimistic locking lost a race; the caller may reload and retry."""

    code = "concurrent_update"
    title = "Concurrent update"


class WalletKeyMissing(Conflict):
    """The action must sign from a wallet whose key this connection does not hold.

    A receive-only connection (``pay_to`` address, no wallet key) can take payments; sending,
    refunding or forwarding needs the key of the address the money leaves from.
    """

    code = "wallet_key_missing"
    title = "Wallet key missing"


class PolicyRefused(ConnectorError):
    """The spending policy said no; ``rule`` names the rule that refused."""

    code = "policy_refused"
    status = 403
    title = "Refused by spending policy"

    def __init__(self, detail: str, rule: str, **context: Any) -> None:
        super().__init__(detail, rule=rule, **context)
        self.rule = rule


class UnsafeURL(ConnectorError):
    """An outbound URL points somewhere the SSRF guard forbids."""

    code = "unsafe_url"
    status = 422
    title = "Unsafe outbound URL"


class ExternalServiceError(ConnectorError):
    """A facilitator, RPC node or webhook target failed or timed out."""

    code = "external_service_error"
    status = 502
    title = "External service error"

    def __init__(self, detail: str, retryable: bool = True, **context: Any) -> None:
        super().__init__(detail, retryable=retryable, **context)
        self.retryable = retryable


class SettlementPending(ExternalServiceError):
    """A transfer was (or may have been) submitted and its outcome is not known yet.

    Never a failure: the payment stays in flight with its budget reservation held, and the
    caller retries later with the same authorization (or the reconciler reads the chain).
    """

    code = "settlement_pending"
    status = 503
    title = "Settlement pending"
