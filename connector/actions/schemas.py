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


class EscrowView(BaseModel):
    """On-chain escrow (``authCapture``): where this payment's money is, from the escrow's
    events as last read (the ledger). ``held + captured + voided + reclaimed`` is what the escrow
    collected; ``refundable = captured - refunded``."""

    collected: bool = Field(description="The escrow collected the funds (authorize or charge).")
    held: Amount = Field(description="Still held by the escrow (capturable).")
    captured: Amount = Field(description="Went to the receiver, fees included.")
    voided: Amount = Field(description="Returned to the payer by the operator's void.")
    reclaimed: Amount = Field(description="Taken back by the payer after the capture deadline.")
    refunded: Amount = Field(description="Returned to the payer by the operator's refunds.")
    refundable: Amount = Field(description="Captured and not refunded yet.")


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
    scheme: str = Field(default="exact", description="`exact` or `authCapture` (escrow).")
    captured_amount: Amount = Field(
        default="0", description="On-chain escrow: what reached the receiver so far."
    )
    escrow: EscrowView | None = Field(
        default=None, description="On-chain escrow amounts; null for any other payment."
    )
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

#: authCapture deadlines: at most a year ahead (the escrow's uint48 allows far more, but a hold
#: that long is a mistake rather than a plan).
ESCROW_MAX_WINDOW_S = 366 * 24 * 3600
ESCROW_DEFAULT_CAPTURE_GRACE_S = 24 * 3600
ESCROW_DEFAULT_REFUND_WINDOW_S = 7 * 24 * 3600


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
        default="both",
        description="x402 versions the paywall offers (`authCapture` is v2 only: the paywall "
        "then offers v2 whatever this says, and `v1` is refused).",
    )
    scheme: Literal["exact", "authCapture"] | None = Field(
        default=None,
        description="How the payer pays. `exact`: an EIP-3009 transfer to `pay_to` (with "
        "`capture: manual`, a hold on the payer's signed authorization). `authCapture`: "
        "on-chain escrow — the funds go into the escrow contract, `release` captures (partial, "
        "repeated), `void` returns what is held, `refund` returns captured money; automatic "
        "capture charges at once. Default: `authCapture` for `capture: manual` where the "
        "escrow contracts are deployed and the facilitator supports them (or when any escrow "
        "term below is given), else `exact`.",
    )
    capture_deadline_s: int | None = Field(
        default=None,
        ge=60,
        le=ESCROW_MAX_WINDOW_S,
        description="authCapture: seconds from now until the capture deadline (after it the "
        "payer can reclaim what is still held). At least `expires_in_s + max_timeout_seconds` "
        "(a payer paying at the last moment signs until then). Default: that plus one day.",
    )
    refund_deadline_s: int | None = Field(
        default=None,
        ge=60,
        le=ESCROW_MAX_WINDOW_S,
        description="authCapture: seconds from now until refunds stop being possible; at least "
        "`capture_deadline_s`. Default: the capture deadline plus seven days.",
    )
    min_fee_bps: int = Field(
        default=0, ge=0, le=10_000, description="authCapture: smallest fee a capture takes."
    )
    max_fee_bps: int = Field(
        default=0, ge=0, le=10_000, description="authCapture: largest fee a capture may take."
    )
    fee_receiver: Address | None = Field(
        default=None,
        description="authCapture: who receives the fees (required when `max_fee_bps` > 0).",
    )
    operator: Address | None = Field(
        default=None,
        description="authCapture: the escrow operator (`captureAuthorizer`), the only address "
        "that may capture, void and refund. Default: the facilitator's signer (its `/supported` "
        "`signers`), which submits the escrow operations.",
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

    @property
    def escrow_terms_given(self) -> bool:
        """Whether any on-chain escrow term was set (which asks for ``authCapture``)."""
        return bool(self.model_fields_set & ESCROW_TERM_FIELDS)

    @model_validator(mode="after")
    def _escrow_terms(self) -> ReceiveInput:
        if self.scheme == "exact" and self.escrow_terms_given:
            given = sorted(self.model_fields_set & ESCROW_TERM_FIELDS)
            raise ValueError(f"{given} apply to the `authCapture` scheme only, not `exact`")
        if self.scheme == "authCapture" or self.escrow_terms_given:
            if self.custodial:
                raise ValueError("custodial escrow and on-chain escrow (`authCapture`) exclude "
                                 "each other")  # fmt: skip
            if self.protocols == "v1":
                raise ValueError("`authCapture` needs x402 v2; `protocols: v1` cannot offer it")
        if self.min_fee_bps > self.max_fee_bps:
            raise ValueError("`min_fee_bps` must not exceed `max_fee_bps`")
        if self.max_fee_bps > 0 and self.fee_receiver is None:
            raise ValueError("`fee_receiver` is required when `max_fee_bps` > 0")
        last_payment = self.expires_in_s + self.max_timeout_seconds
        if self.capture_deadline_s is not None and self.capture_deadline_s < last_payment:
            raise ValueError(
                f"`capture_deadline_s` ({self.capture_deadline_s}) must be at least "
                f"`expires_in_s` + `max_timeout_seconds` ({last_payment}): a payer paying just "
                "before the offer expires signs an authorization valid that long"
            )
        capture = self.capture_window_s()
        if self.refund_deadline_s is not None and self.refund_deadline_s < capture:
            raise ValueError(
                f"`refund_deadline_s` ({self.refund_deadline_s}) must be at least the capture "
                f"deadline ({capture} s)"
            )
        return self

    def capture_window_s(self) -> int:
        """Seconds from creation to the capture deadline (the default: one day after the last
        moment a payer's authorization can be valid)."""
        if self.capture_deadline_s is not None:
            return self.capture_deadline_s
        return self.expires_in_s + self.max_timeout_seconds + ESCROW_DEFAULT_CAPTURE_GRACE_S

    def refund_window_s(self) -> int:
        if self.refund_deadline_s is not None:
            return self.refund_deadline_s
        return self.capture_window_s() + ESCROW_DEFAULT_REFUND_WINDOW_S


#: The escrow terms of ``receive`` (any of them given asks for ``authCapture``).
ESCROW_TERM_FIELDS = frozenset(
    {
        "capture_deadline_s",
        "refund_deadline_s",
        "min_fee_bps",
        "max_fee_bps",
        "fee_receiver",
        "operator",
    }
)


class EscrowTermsView(BaseModel):
    """What an ``authCapture`` paywall commits every payer to (absolute Unix seconds)."""

    operator: str = Field(description="The escrow operator (`captureAuthorizer`).")
    capture_deadline: int = Field(description="Last second to capture; then the payer may reclaim.")
    refund_deadline: int = Field(description="Last second a refund is possible.")
    min_fee_bps: int
    max_fee_bps: int
    fee_receiver: str
    escrow: str = Field(description="The escrow contract (canonical AuthCaptureEscrow).")


class PaymentRequestView(BaseModel):
    id: str
    object: Literal["payment_request"] = "payment_request"
    url: str = Field(description="Paywall URL to hand to payers.")
    amount: Amount
    asset: str
    network: str
    pay_to: str
    protocols: str = "both"
    scheme: Literal["exact", "authCapture"] = "exact"
    escrow_terms: EscrowTermsView | None = Field(
        default=None, description="authCapture only: the escrow terms every payer signs."
    )
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


class ReleaseInput(PaymentRef):
    """Capture a held payment. On-chain escrow (``authCapture``) captures any part of what is
    still held, as often as wanted; a manual-capture ``exact`` hold is captured whole."""

    amount: Amount | None = Field(
        default=None,
        description="authCapture: how much to capture (default: everything still held).",
    )
    fee_bps: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="authCapture: the fee this capture takes, within the terms' "
        "`min_fee_bps`..`max_fee_bps` (default: `min_fee_bps`), paid to their `fee_receiver`.",
    )


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
