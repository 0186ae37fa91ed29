"""Typed inputs and outputs of every action.

Amounts are decimal strings of atomic units on the wire (JSON numbers lose precision beyond
2**53); they are validated here and become ``int`` inside the domain.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_TX = re.compile(r"^0x[0-9a-fA-F]{64}$")
_ATOMIC = re.compile(r"^[0-9]{1,78}$")
UINT256_MAX = 2**256 - 1


def _uint256(value: str) -> str:
    """78 digits reach 10**78 - 1, above uint256: such an amount could never be paid on-chain."""
    if _ATOMIC.match(value) and int(value) > UINT256_MAX:
        raise ValueError("exceeds the largest uint256 amount (2**256 - 1)")
    return value


Amount = Annotated[
    str,
    Field(
        pattern=_ATOMIC.pattern,
        description="Amount in atomic units as a decimal string (1 USDC = 1000000), at most "
        "2**256 - 1.",
        examples=["10000"],
    ),
    AfterValidator(_uint256),
]
Address = Annotated[str, Field(pattern=_ADDRESS.pattern, description="EVM address (0x + 40 hex).")]
TxHash = Annotated[str, Field(pattern=_TX.pattern, description="Transaction hash (0x + 64 hex).")]


# --- per-field limits (docs/security.md lists them; the whole body is bounded at the edge) ------
MAX_HEADERS = 32
MAX_METADATA_KEYS = 32
MAX_RESOURCE_BYTES = 64 * 1024  # a `receive` resource is stored and served on every paid hit
MAX_X402_JSON_BYTES = 32 * 1024  # a payment payload or requirements object (`verify`)
#: Headers that carry credentials. Job inputs are stored as given, so `send` refuses them rather
#: than keep a caller's secrets in clear text in the jobs table.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)
_CREDENTIAL_WORDS = ("token", "secret", "password", "api-key", "apikey", "session")

HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")]
HeaderValue = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\r\n\x00]*$")]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=8192)


# --- send -------------------------------------------------------------------------------------


class SendInput(_Model):
    """Pay an x402-protected URL, or pay an address directly."""

    url: str | None = Field(
        default=None, max_length=2048, description="x402-protected resource to pay and fetch."
    )
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        max_length=MAX_HEADERS,
        description="Extra request headers (no credentials: they would be stored with the job).",
    )
    body: str | None = Field(default=None, max_length=1_000_000, description="Request body.")
    to: Address | None = Field(default=None, description="Pay this address directly (no URL).")
    amount: Amount | None = Field(default=None, description="Required with `to`.")
    max_amount: Amount | None = Field(
        default=None, description="Refuse a URL's price above this (on top of the policy)."
    )
    asset: Address | None = Field(default=None, description="Token; default: network's USDC.")
    network: str | None = Field(
        default=None, description="CAIP-2 or v1 name; default: connection's."
    )
    description: str | None = Field(default=None, max_length=1024)
    dry_run: bool = Field(default=False, description="Decide and record, sign nothing.")
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=MAX_METADATA_KEYS
    )

    @model_validator(mode="after")
    def _url_xor_address(self) -> SendInput:
        if (self.url is None) == (self.to is None):
            raise ValueError("give exactly one of `url` or `to`")
        if self.to is not None and self.amount is None:
            raise ValueError("`amount` is required when paying an address")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("`url` must be http(s)")
        return self

    @field_validator("headers")
    @classmethod
    def _no_payment_headers(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {"x-payment", "payment-signature", "host", "content-length"}
        clash = reserved.intersection(k.lower() for k in value)
        if clash:
            raise ValueError(f"headers may not set {sorted(clash)}")
        secret = sorted(
            k
            for k in value
            if k.lower() in CREDENTIAL_HEADERS or any(w in k.lower() for w in _CREDENTIAL_WORDS)
        )
        if secret:
            raise ValueError(
                f"credential headers are not accepted ({secret}): job inputs are stored, "
                "and a secret must not be kept in clear text"
            )
        return value


class HttpResult(_Model):
    status: int
    headers: dict[str, str]
    body: str | None = Field(description="Body as text (UTF-8) or base64 when binary.")
    body_encoding: Literal["utf-8", "base64"] = "utf-8"
    truncated: bool = False


class PaymentView(BaseModel):
    """Public snapshot of a payment (no signed payload, no secrets)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["payment"] = "payment"
    connection_id: str
    direction: Literal["outgoing", "incoming"]
    state: str
    amount: Amount
    refunded_amount: Amount
    asset: str
    network: str
    payer: str | None
    payee: str
    tx_hash: str | None = None
    failure_code: str | None = None
    failure_reason: str | None = None
    created_at: str
    updated_at: str


class SendOutput(_Model):
    payment: PaymentView | None = Field(
        default=None, description="None when the URL did not ask for payment."
    )
    response: HttpResult | None = Field(
        default=None, description="The paid resource's response (URL payments)."
    )


# --- receive ----------------------------------------------------------------------------------


class ReceiveInput(_Model):
    """Offer a paid resource at a paywall URL that any x402 client (v1 or v2) can pay."""

    amount: Amount
    asset: Address | None = None
    network: str | None = None
    description: str = Field(default="", max_length=1024)
    resource: dict[str, Any] | None = Field(
        default=None,
        description=f"JSON delivered to the payer after payment (at most {MAX_RESOURCE_BYTES} "
        "bytes serialized).",
    )
    redirect_url: str | None = Field(default=None, max_length=2048)
    mime_type: str = Field(default="application/json", max_length=128)
    expires_in_s: int = Field(default=3600, ge=10, le=30 * 24 * 3600)
    max_timeout_seconds: int = Field(default=300, ge=30, le=3600)
    capture: Literal["automatic", "manual"] | None = Field(
        default=None, description="manual = hold (escrow) until release/void."
    )
    custodial: bool = Field(
        default=False, description="Payer pays the connection's escrow address."
    )
    beneficiary: Address | None = Field(
        default=None, description="Who `release` pays (custodial escrow)."
    )
    max_payments: int = Field(default=1, ge=1, le=1_000_000)
    pay_to: Address | None = Field(
        default=None,
        description="Address the payer pays (default: the connection's pay_to or wallet). "
        "Receiving needs no key for it.",
    )
    protocols: Literal["both", "v1", "v2"] = Field(
        default="both", description="x402 versions the paywall offers."
    )

    @field_validator("resource")
    @classmethod
    def _resource_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _json_size(value) > MAX_RESOURCE_BYTES:
            raise ValueError(f"must be at most {MAX_RESOURCE_BYTES} bytes as JSON")
        return value

    @model_validator(mode="after")
    def _custody(self) -> ReceiveInput:
        if self.custodial and self.beneficiary is None:
            raise ValueError("`beneficiary` is required with custodial escrow")
        return self


class PaymentRequestView(BaseModel):
    id: str
    object: Literal["payment_request"] = "payment_request"
    url: str = Field(description="Paywall URL to hand to payers.")
    amount: Amount
    asset: str
    network: str
    pay_to: str
    protocols: str = "both"
    capture: str
    custodial: bool
    max_payments: int
    paid_count: int
    status: str
    expires_at: str | None


class ReceiveOutput(_Model):
    payment_request: PaymentRequestView


# --- verify -----------------------------------------------------------------------------------


class VerifyInput(_Model):
    """Check a payment payload against requirements, or a transaction on-chain."""

    payment_payload: dict[str, Any] | str | None = Field(
        default=None, description="x402 payload (object, or the base64 header value)."
    )
    requirements: dict[str, Any] | None = Field(
        default=None, description="x402 payment requirements (v1 or v2 shape)."
    )
    tx_hash: TxHash | None = None
    expected_to: Address | None = None
    expected_amount: Amount | None = None
    asset: Address | None = None
    min_confirmations: int = Field(default=1, ge=0, le=1000)

    @field_validator("payment_payload", "requirements")
    @classmethod
    def _x402_size(cls, value: Any) -> Any:
        if value is not None and _json_size(value) > MAX_X402_JSON_BYTES:
            raise ValueError(f"must be at most {MAX_X402_JSON_BYTES} bytes as JSON")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> VerifyInput:
        by_payload = self.payment_payload is not None
        if by_payload == (self.tx_hash is not None):
            raise ValueError("give either `payment_payload` (+ `requirements`) or `tx_hash`")
        if by_payload and self.requirements is None:
            raise ValueError("`requirements` is required with `payment_payload`")
        return self


class TransferView(BaseModel):
    from_: str = Field(alias="from")
    to: str
    value: Amount
    log_index: int

    model_config = ConfigDict(populate_by_name=True)


class VerifyOutput(_Model):
    valid: bool
    reason: str | None = None
    payer: str | None = None
    transfers: list[TransferView] = Field(default_factory=list)
    confirmations: int | None = None


# --- refund / release / void --------------------------------------------------------------------


class RefundInput(_Model):
    payment_id: str = Field(pattern=r"^pay_[0-9a-z]{26}$")
    amount: Amount | None = Field(default=None, description="Default: everything not yet refunded.")
    reason: str | None = Field(default=None, max_length=1024)


class RefundView(BaseModel):
    id: str
    payment_id: str
    amount: Amount
    state: str
    tx_hash: str | None
    failure_reason: str | None = None


class RefundOutput(_Model):
    refund: RefundView
    payment: PaymentView


class PaymentRef(_Model):
    payment_id: str = Field(pattern=r"^pay_[0-9a-z]{26}$")


class PaymentOutput(_Model):
    payment: PaymentView


# --- balance ----------------------------------------------------------------------------------


class BalanceInput(_Model):
    asset: Address | None = None
    history_limit: int = Field(default=20, ge=0, le=200)


class BalanceOutput(_Model):
    address: str
    network: str
    asset: str
    balance: Amount
    history: list[PaymentView]


# --- jobs -------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "requires_approval", "pending", "succeeded", "failed"]


class JobProblem(BaseModel):
    """Why a job failed: an RFC 9457 problem object with stable, machine-readable members."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://x402c.dev/problems/policy_refused"])
    title: str
    status: int = Field(description="The HTTP status this problem would have as a response.")
    detail: str
    code: str = Field(
        description="Stable error code (the type's last part), e.g. `policy_refused`, "
        "`settlement_failed`, `http_error`, `approval_rejected`, `payment_expired`."
    )
    retryable: bool = Field(
        description="True when the same call may succeed later unchanged (an outage, a 5xx); "
        "false when something must change first (policy, input, state). Retry with a NEW "
        "Idempotency-Key: the same key returns this same job."
    )
    rule: str | None = Field(
        default=None,
        description="With `policy_refused`: the policy rule that refused "
        "(`max_per_payment`, `domain_allow`, `budget.day`…).",
    )
    payment_id: str | None = None


class JobBase(BaseModel):
    """An action call. ``status`` is the action's real outcome (see docs/workflow-builder.md)."""

    id: str = Field(examples=["job_01jdsample00000000000000000"])
    object: Literal["job"] = "job"
    status: JobStatus = Field(
        description="`succeeded` and `failed` are final. `requires_approval` (admins must "
        "approve the payment) and `pending` (the payment's outcome is not known yet) resolve "
        "later by themselves; `queued`/`running`: not done yet."
    )
    connection_id: str
    payment_id: str | None = Field(
        default=None, description="The payment this job made or acts on, when there is one."
    )
    error: JobProblem | None = Field(
        default=None, description="Set when `status` is `failed` (and while a retry waits)."
    )
    created_at: str
    updated_at: str
