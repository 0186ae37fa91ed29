"""The ``authCapture`` scheme on EVM: on-chain escrow through Base Commerce Payments.

The payer signs ONE ERC-3009 ``ReceiveWithAuthorization`` to the canonical token collector whose
nonce is the payer-agnostic hash of the payment terms (``PaymentInfo``). The escrow's operator
(``extra.captureAuthorizer``) then authorizes (holds the funds in the escrow) or charges (pays
out at once), captures part or all of a hold, voids it, or refunds; after the capture deadline the
payer alone can reclaim what is still held. Nothing here trusts a server: every field the payer
agreed to is inside the hash the token checks.

This module is the protocol: terms, hashes and nonces exactly as the official TypeScript client
computes them (tests compare against that client and against the contract's ``getHash``), the
client's signature, ``extra`` parsing with the spec's error codes, escrow calldata, and the decoding
of escrow reverts into stable reason codes. It performs no I/O.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from eth_abi.abi import decode, encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from connector.x402 import exact_evm
from connector.x402.errors import MalformedPayment
from connector.x402.networks import chain_id_of
from connector.x402.requirement import Requirement

SCHEME = "authCapture"
#: The official TypeScript client (``@x402/evm`` 2.27) registers itself under this name.
SCHEME_ALIASES = frozenset({"authCapture", "auth-capture"})
OPERATIONS = ("authorize", "charge", "capture", "void", "refund")
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
MAX_FEE_BPS = 10_000
UINT48_MAX = 2**48 - 1
UINT120_MAX = 2**120 - 1
#: A deadline must leave this much time for the transaction to land (spec: now + 6 s).
SETTLEMENT_MARGIN_S = 6

# ----------------------------------------------------------------------------- error codes
# The spec's verification reasons (scheme_authCapture_evm.md, "Error Codes").
INVALID_PAYLOAD_FORMAT = "invalid_payload_format"
INVALID_OPERATION_TYPE = "invalid_operation_type"
UNSUPPORTED_SCHEME = "unsupported_scheme"
NETWORK_MISMATCH = "network_mismatch"
INVALID_NETWORK = "invalid_network"
INVALID_EXTRA = "invalid_authCapture_extra"
PAYMENT_INFO_MISMATCH = "payment_info_mismatch"
MISSING_SERVER_AUTHORIZATION = "missing_server_authorization"
INVALID_SERVER_AUTHORIZATION = "invalid_server_authorization"
UNSUPPORTED_METHOD = "unsupported_asset_transfer_method"
PAYLOAD_METHOD_MISMATCH = "payload_method_mismatch"
CAPTURE_DEADLINE_EXPIRED = "capture_deadline_expired"
INVALID_DEADLINE_ORDERING = "invalid_deadline_ordering"
AUTHORIZATION_EXPIRED = "authorization_expired"
AUTHORIZATION_NOT_YET_VALID = "authorization_not_yet_valid"
INVALID_SIGNATURE = "invalid_authCapture_signature"
AMOUNT_MISMATCH = "amount_mismatch"
TOKEN_COLLECTOR_MISMATCH = "token_collector_mismatch"
TOKEN_MISMATCH = "token_mismatch"
NONCE_MISMATCH = "nonce_mismatch"
INVALID_OPERATION_STATE = "invalid_operation_state"
INSUFFICIENT_BALANCE = "insufficient_balance"
SIMULATION_FAILED = "simulation_failed"
VERIFICATION_FAILED = "verification_failed"
TRANSACTION_REVERTED = "transaction_reverted"


class AuthCaptureInvalid(MalformedPayment):
    """A payload or requirement the scheme refuses; ``reason`` is the spec's error code."""

    code = "x402_auth_capture_invalid"
    title = "Invalid authCapture payment"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, reason=reason)
        self.reason = reason


# ----------------------------------------------------------------------------- deployments


@dataclass(frozen=True)
class Deployment:
    """One release of the canonical contracts (same addresses on every supported chain)."""

    version: str
    escrow: str
    eip3009_collector: str
    permit2_collector: str
    operator_refund_collector: str


DEPLOYMENT_V1_0 = Deployment(
    version="v1.0",
    escrow="0xBdEA0D1bcC5966192B070Fdf62aB4EF5b4420cff",
    eip3009_collector="0x0E3dF9510de65469C4518D7843919c0b8C7A7757",
    permit2_collector="0x992476B9Ee81d52a5BdA0622C333938D0Af0aB26",
    operator_refund_collector="0x934907bffd0901b6A21e398B9C53A4A38F02fa5d",
)
DEPLOYMENT_V1_1 = Deployment(
    version="v1.1",
    escrow="0xf96815976523E00e65Be8f34cA5e64b4f41EB19c",
    eip3009_collector="0x8612dfdc421f80336cd14E8EF9cb1E765dB5ab88",
    permit2_collector="0xD69831Aed5bfe262067ec4c751f4F830EcdD446e",
    operator_refund_collector="0x7a03443724d14798c4AB4622F1DAAcA761Fea486",
)
DEPLOYMENTS = (DEPLOYMENT_V1_0, DEPLOYMENT_V1_1)
DEFAULT_DEPLOYMENT = DEPLOYMENT_V1_1


def resolve_deployment(escrow: Any) -> Deployment | None:
    """``extra.authCaptureEscrow`` → the deployment it names; absent means the default (v1.1).
    An unknown address is ``None``: nobody may redirect a payer's signature to another escrow."""
    if escrow is None or escrow == "":
        return DEFAULT_DEPLOYMENT
    if not isinstance(escrow, str) or len(escrow) != 42:
        return None
    for deployment in DEPLOYMENTS:
        if deployment.escrow.lower() == escrow.lower():
            return deployment
    return None


# ----------------------------------------------------------------------------- PaymentInfo

PAYMENT_INFO_TYPE = (
    "PaymentInfo(address operator,address payer,address receiver,address token,uint120 maxAmount,"
    "uint48 preApprovalExpiry,uint48 authorizationExpiry,uint48 refundExpiry,uint16 minFeeBps,"
    "uint16 maxFeeBps,address feeReceiver,uint256 salt)"
)
PAYMENT_INFO_TYPEHASH = keccak(text=PAYMENT_INFO_TYPE)
PAYMENT_INFO_ABI = (
    "(address,address,address,address,uint120,uint48,uint48,uint48,uint16,uint16,address,uint256)"
)
_FIELD_TYPES = [
    "address", "address", "address", "address", "uint120", "uint48", "uint48", "uint48",
    "uint16", "uint16", "address", "uint256",
]  # fmt: skip


@dataclass(frozen=True)
class PaymentInfo:
    """The escrow's payment terms (on-chain field names; wire ``extra`` names map onto them:
    captureAuthorizer→operator, captureDeadline→authorizationExpiry,
    refundDeadline→refundExpiry, feeRecipient→feeReceiver)."""

    operator: str
    payer: str
    receiver: str
    token: str
    max_amount: int
    pre_approval_expiry: int
    authorization_expiry: int
    refund_expiry: int
    min_fee_bps: int
    max_fee_bps: int
    fee_receiver: str
    salt: int

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            to_checksum_address(self.operator),
            to_checksum_address(self.payer),
            to_checksum_address(self.receiver),
            to_checksum_address(self.token),
            self.max_amount,
            self.pre_approval_expiry,
            self.authorization_expiry,
            self.refund_expiry,
            self.min_fee_bps,
            self.max_fee_bps,
            to_checksum_address(self.fee_receiver),
            self.salt,
        )

    def without_payer(self) -> PaymentInfo:
        return replace(self, payer=ZERO_ADDRESS)

    def to_wire(self) -> dict[str, Any]:
        """JSON form (amount and salt as strings/hex: they exceed JavaScript's safe integers)."""
        return {
            "operator": to_checksum_address(self.operator),
            "payer": to_checksum_address(self.payer),
            "receiver": to_checksum_address(self.receiver),
            "token": to_checksum_address(self.token),
            "maxAmount": str(self.max_amount),
            "preApprovalExpiry": self.pre_approval_expiry,
            "authorizationExpiry": self.authorization_expiry,
            "refundExpiry": self.refund_expiry,
            "minFeeBps": self.min_fee_bps,
            "maxFeeBps": self.max_fee_bps,
            "feeReceiver": to_checksum_address(self.fee_receiver),
            "salt": "0x" + self.salt.to_bytes(32, "big").hex(),
        }


def _uint_field(data: dict[str, Any], key: str, bits: int, where: str) -> int:
    value = data.get(key)
    if isinstance(value, bool):
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, f"{where}.{key} must be an integer")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise AuthCaptureInvalid(
                INVALID_PAYLOAD_FORMAT, f"{where}.{key} must be an integer"
            ) from None
        value = number
    if not isinstance(value, int) or value < 0 or value >= 2**bits:
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, f"{where}.{key} must be a uint{bits}")
    return value


def _address_field(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, f"{where}.{key} must be an address")
    try:
        return str(to_checksum_address(value))
    except ValueError:
        raise AuthCaptureInvalid(
            INVALID_PAYLOAD_FORMAT, f"{where}.{key} must be an address"
        ) from None


def payment_info_from_wire(data: Any, where: str = "payload.paymentInfo") -> PaymentInfo:
    if not isinstance(data, dict):
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, f"{where} must be a JSON object")
    return PaymentInfo(
        operator=_address_field(data, "operator", where),
        payer=_address_field(data, "payer", where),
        receiver=_address_field(data, "receiver", where),
        token=_address_field(data, "token", where),
        max_amount=_uint_field(data, "maxAmount", 120, where),
        pre_approval_expiry=_uint_field(data, "preApprovalExpiry", 48, where),
        authorization_expiry=_uint_field(data, "authorizationExpiry", 48, where),
        refund_expiry=_uint_field(data, "refundExpiry", 48, where),
        min_fee_bps=_uint_field(data, "minFeeBps", 16, where),
        max_fee_bps=_uint_field(data, "maxFeeBps", 16, where),
        fee_receiver=_address_field(data, "feeReceiver", where),
        salt=_uint_field(data, "salt", 256, where),
    )


def payment_info_struct_hash(info: PaymentInfo) -> bytes:
    """keccak256(abi.encode(PAYMENT_INFO_TYPEHASH, info))."""
    return keccak(encode(["bytes32", *_FIELD_TYPES], [PAYMENT_INFO_TYPEHASH, *info.as_tuple()]))


def payment_info_hash(info: PaymentInfo, *, chain_id: int, escrow: str) -> bytes:
    """The escrow's ``getHash``: the payment's id, bound to one chain and one escrow."""
    return keccak(
        encode(
            ["uint256", "address", "bytes32"],
            [chain_id, to_checksum_address(escrow), payment_info_struct_hash(info)],
        )
    )


def payer_agnostic_nonce(info: PaymentInfo, *, chain_id: int, escrow: str) -> str:
    """The ERC-3009 nonce the payer signs: ``getHash`` of the terms with the payer zeroed."""
    return "0x" + payment_info_hash(info.without_payer(), chain_id=chain_id, escrow=escrow).hex()


SALT_BINDING_TYPEHASH = keccak(
    text="x402AuthCaptureSaltBinding(address receiverAuthorizer,address policy,uint256 saltNonce)"
)


def bound_salt(receiver_authorizer: str, policy: str, salt_nonce: int) -> int:
    """The salt when the server asks for salt binding (``extra.receiverAuthorizer``/``policy``)."""
    digest = keccak(
        encode(
            ["bytes32", "address", "address", "uint256"],
            [
                SALT_BINDING_TYPEHASH,
                to_checksum_address(receiver_authorizer),
                to_checksum_address(policy),
                salt_nonce,
            ],
        )
    )
    return int.from_bytes(digest, "big")


# ----------------------------------------------------------------------------- extra


@dataclass(frozen=True)
class AuthCaptureExtra:
    name: str
    version: str
    capture_authorizer: str
    capture_deadline: int
    refund_deadline: int
    fee_recipient: str
    min_fee_bps: int
    max_fee_bps: int
    server_authorization_required: bool
    asset_transfer_method: str
    deployment: Deployment
    receiver_authorizer: str
    policy: str

    @property
    def salt_binding(self) -> bool:
        return self.receiver_authorizer != ZERO_ADDRESS or self.policy != ZERO_ADDRESS


def _extra_int(extra: dict[str, Any], key: str, bits: int) -> int:
    value = extra.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise AuthCaptureInvalid(INVALID_EXTRA, f"extra.{key} must be a uint{bits} number")
    return value


def _extra_address(extra: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = extra.get(key)
    if value is None and not required:
        return ZERO_ADDRESS
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        raise AuthCaptureInvalid(INVALID_EXTRA, f"extra.{key} must be an address")
    try:
        return str(to_checksum_address(value))
    except ValueError:
        raise AuthCaptureInvalid(INVALID_EXTRA, f"extra.{key} must be an address") from None


def parse_extra(extra: dict[str, Any]) -> AuthCaptureExtra:
    """Validate a requirement's ``extra`` (spec step 4); raises with ``invalid_authCapture_extra``
    or ``unsupported_asset_transfer_method``."""
    if not isinstance(extra, dict):
        raise AuthCaptureInvalid(INVALID_EXTRA, "extra must be a JSON object")
    for key in ("name", "version"):
        if not isinstance(extra.get(key), str) or not extra[key]:
            raise AuthCaptureInvalid(INVALID_EXTRA, f"extra.{key} must be a non-empty string")
    capture_authorizer = _extra_address(extra, "captureAuthorizer")
    if capture_authorizer == ZERO_ADDRESS:
        raise AuthCaptureInvalid(INVALID_EXTRA, "extra.captureAuthorizer must not be zero")
    min_fee = _extra_int(extra, "minFeeBps", 16)
    max_fee = _extra_int(extra, "maxFeeBps", 16)
    if max_fee > MAX_FEE_BPS or min_fee > max_fee:
        raise AuthCaptureInvalid(
            INVALID_EXTRA, "extra fee bounds must satisfy minFeeBps <= maxFeeBps <= 10000"
        )
    method = extra.get("assetTransferMethod", "eip3009")
    if method not in ("eip3009", "permit2"):
        raise AuthCaptureInvalid(UNSUPPORTED_METHOD, f"assetTransferMethod {method!r} unsupported")
    required = extra.get("serverAuthorizationRequired", False)
    if not isinstance(required, bool):
        raise AuthCaptureInvalid(INVALID_EXTRA, "extra.serverAuthorizationRequired must be bool")
    deployment = resolve_deployment(extra.get("authCaptureEscrow"))
    if deployment is None:
        raise AuthCaptureInvalid(INVALID_EXTRA, "extra.authCaptureEscrow is not a known escrow")
    return AuthCaptureExtra(
        name=extra["name"],
        version=extra["version"],
        capture_authorizer=capture_authorizer,
        capture_deadline=_extra_int(extra, "captureDeadline", 48),
        refund_deadline=_extra_int(extra, "refundDeadline", 48),
        fee_recipient=_extra_address(extra, "feeRecipient"),
        min_fee_bps=min_fee,
        max_fee_bps=max_fee,
        server_authorization_required=required,
        asset_transfer_method=str(method),
        deployment=deployment,
        receiver_authorizer=_extra_address(extra, "receiverAuthorizer", required=False),
        policy=_extra_address(extra, "policy", required=False),
    )


def build_extra(
    *,
    token_name: str,
    token_version: str,
    capture_authorizer: str,
    capture_deadline: int,
    refund_deadline: int,
    fee_recipient: str = ZERO_ADDRESS,
    min_fee_bps: int = 0,
    max_fee_bps: int = 0,
    server_authorization_required: bool = False,
    deployment: Deployment = DEFAULT_DEPLOYMENT,
    auto_capture: bool = False,
) -> dict[str, Any]:
    """The ``extra`` a server advertises (validated by :func:`parse_extra` before returning).
    ``auto_capture``: the server will ``charge`` (collect and capture at once) instead of
    ``authorize`` (hold); the spec's ``autoCapture``, absent when false."""
    extra: dict[str, Any] = {
        "name": token_name,
        "version": token_version,
        "captureAuthorizer": to_checksum_address(capture_authorizer),
        "captureDeadline": capture_deadline,
        "refundDeadline": refund_deadline,
        "feeRecipient": to_checksum_address(fee_recipient),
        "minFeeBps": min_fee_bps,
        "maxFeeBps": max_fee_bps,
        "assetTransferMethod": "eip3009",
    }
    if server_authorization_required:
        extra["serverAuthorizationRequired"] = True
    if auto_capture:
        extra["autoCapture"] = True
    if deployment != DEFAULT_DEPLOYMENT:
        extra["authCaptureEscrow"] = deployment.escrow
    parse_extra(extra)
    return extra


def terms_for(
    requirement: Requirement,
    extra: AuthCaptureExtra,
    *,
    payer: str,
    salt: int,
    pre_approval_expiry: int,
) -> PaymentInfo:
    """The PaymentInfo a requirement commits to (what client, server and facilitator rebuild)."""
    return PaymentInfo(
        operator=extra.capture_authorizer,
        payer=to_checksum_address(payer),
        receiver=requirement.pay_to,
        token=requirement.asset,
        max_amount=requirement.amount,
        pre_approval_expiry=pre_approval_expiry,
        authorization_expiry=extra.capture_deadline,
        refund_expiry=extra.refund_deadline,
        min_fee_bps=extra.min_fee_bps,
        max_fee_bps=extra.max_fee_bps,
        fee_receiver=extra.fee_recipient,
        salt=salt,
    )


# ----------------------------------------------------------------------------- ERC-3009 receive

RECEIVE_TYPEHASH = keccak(
    text="ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)


def receive_digest(
    auth: exact_evm.Authorization, *, token_name: str, token_version: str, chain_id: int, asset: str
) -> bytes:
    """EIP-712 digest of a ``ReceiveWithAuthorization`` (the collector is the payee)."""
    struct_hash = keccak(
        encode(
            ["bytes32", "address", "address", "uint256", "uint256", "uint256", "bytes32"],
            [
                RECEIVE_TYPEHASH,
                to_checksum_address(auth.from_),
                to_checksum_address(auth.to),
                auth.value,
                auth.valid_after,
                auth.valid_before,
                bytes.fromhex(auth.nonce[2:]),
            ],
        )
    )
    separator = exact_evm.domain_separator(token_name, token_version, chain_id, asset)
    return keccak(b"\x19\x01" + separator + struct_hash)


@dataclass(frozen=True)
class ClientPayload:
    """What a payer sends (inside the x402 payment payload): the signed authorization and the
    salt; the server adds ``type`` and ``paymentInfo`` before asking the facilitator."""

    authorization: exact_evm.Authorization
    signature: bytes
    salt: int
    salt_nonce: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "authorization": self.authorization.to_wire(),
            "signature": "0x" + self.signature.hex(),
            "salt": "0x" + self.salt.to_bytes(32, "big").hex(),
        }
        if self.salt_nonce is not None:
            out["saltNonce"] = "0x" + self.salt_nonce.to_bytes(32, "big").hex()
        return out


def is_auth_capture(requirement: Requirement) -> bool:
    return requirement.scheme in SCHEME_ALIASES


def sign_auth_capture(
    account: exact_evm.SigningKey,
    requirement: Requirement,
    *,
    now: int | None = None,
    salt: int | None = None,
) -> tuple[ClientPayload, PaymentInfo]:
    """Sign an ``authCapture`` requirement as the TypeScript client does: fresh salt,
    preApprovalExpiry = now + maxTimeoutSeconds, nonce = payer-agnostic PaymentInfo hash,
    ``ReceiveWithAuthorization`` of ``amount`` to the canonical EIP-3009 collector."""
    if not is_auth_capture(requirement):
        raise AuthCaptureInvalid(UNSUPPORTED_SCHEME, f"cannot sign scheme {requirement.scheme!r}")
    extra = parse_extra(requirement.extra)
    if extra.asset_transfer_method != "eip3009":
        raise AuthCaptureInvalid(UNSUPPORTED_METHOD, "only the eip3009 method is implemented")
    now = int(time.time()) if now is None else now
    pre_approval_expiry = now + requirement.max_timeout_seconds
    salt_nonce: int | None = None
    if salt is None:
        salt = int.from_bytes(secrets.token_bytes(32), "big")
    if extra.salt_binding:
        salt_nonce = salt
        salt = bound_salt(extra.receiver_authorizer, extra.policy, salt_nonce)
    info = terms_for(
        requirement,
        extra,
        payer=account.address,
        salt=salt,
        pre_approval_expiry=pre_approval_expiry,
    )
    chain_id = chain_id_of(requirement.network)
    auth = exact_evm.Authorization(
        from_=to_checksum_address(account.address),
        to=extra.deployment.eip3009_collector,
        value=requirement.amount,
        valid_after=0,
        valid_before=pre_approval_expiry,
        nonce=payer_agnostic_nonce(info, chain_id=chain_id, escrow=extra.deployment.escrow),
    )
    digest = receive_digest(
        auth,
        token_name=extra.name,
        token_version=extra.version,
        chain_id=chain_id,
        asset=requirement.asset,
    )
    return ClientPayload(auth, exact_evm.sign_digest(account.key, digest), salt, salt_nonce), info


def parse_client_payload(data: Any, where: str = "payload") -> ClientPayload:
    if not isinstance(data, dict):
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, f"{where} must be a JSON object")
    if "authorization" not in data:
        code = PAYLOAD_METHOD_MISMATCH if "permit2Authorization" in data else INVALID_PAYLOAD_FORMAT
        raise AuthCaptureInvalid(code, f"{where}.authorization is required (eip3009)")
    try:
        exact = exact_evm.parse_exact_payload(
            {"authorization": data.get("authorization"), "signature": data.get("signature")}, where
        )
    except MalformedPayment as exc:
        raise AuthCaptureInvalid(INVALID_PAYLOAD_FORMAT, exc.detail) from None
    salt_nonce = data.get("saltNonce")
    return ClientPayload(
        authorization=exact.authorization,
        signature=exact.signature,
        salt=_uint_field(data, "salt", 256, where),
        salt_nonce=None if salt_nonce is None else _uint_field(data, "saltNonce", 256, where),
    )


# ----------------------------------------------------------------------------- server authorization

SERVER_AUTHORIZATION_TYPEHASH = keccak(text="ServerAuthorization(bytes32 nonce)")


def server_authorization_digest(nonce: str, *, chain_id: int, escrow: str) -> bytes:
    separator = exact_evm.domain_separator("x402 AuthCapture", "1", chain_id, escrow)
    struct_hash = keccak(
        encode(["bytes32", "bytes32"], [SERVER_AUTHORIZATION_TYPEHASH, bytes.fromhex(nonce[2:])])
    )
    return keccak(b"\x19\x01" + separator + struct_hash)


def sign_server_authorization(
    account: exact_evm.SigningKey, nonce: str, *, chain_id: int, escrow: str
) -> dict[str, str]:
    digest = server_authorization_digest(nonce, chain_id=chain_id, escrow=escrow)
    return {"signature": "0x" + exact_evm.sign_digest(account.key, digest).hex()}


# ----------------------------------------------------------------------------- escrow calldata


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


_P = PAYMENT_INFO_ABI
SEL_AUTHORIZE = _selector(f"authorize({_P},uint256,address,bytes)")
SEL_CHARGE = _selector(f"charge({_P},uint256,address,bytes,uint16,address)")
SEL_CAPTURE = _selector(f"capture({_P},uint256,uint16,address)")
SEL_VOID = _selector(f"void({_P})")
SEL_RECLAIM = _selector(f"reclaim({_P})")
SEL_REFUND = _selector(f"refund({_P},uint256,address,bytes)")
SEL_GET_HASH = _selector(f"getHash({_P})")
SEL_PAYMENT_STATE = _selector("paymentState(bytes32)")
SEL_GET_TOKEN_STORE = _selector("getTokenStore(address)")


def _call(sel: bytes, types: list[str], values: list[Any]) -> str:
    return "0x" + (sel + encode(types, values)).hex()


def authorize_data(info: PaymentInfo, amount: int, collector: str, collector_data: bytes) -> str:
    return _call(
        SEL_AUTHORIZE,
        [_P, "uint256", "address", "bytes"],
        [info.as_tuple(), amount, to_checksum_address(collector), collector_data],
    )


def charge_data(
    info: PaymentInfo,
    amount: int,
    collector: str,
    collector_data: bytes,
    fee_bps: int,
    fee_receiver: str,
) -> str:
    return _call(
        SEL_CHARGE,
        [_P, "uint256", "address", "bytes", "uint16", "address"],
        [
            info.as_tuple(),
            amount,
            to_checksum_address(collector),
            collector_data,
            fee_bps,
            to_checksum_address(fee_receiver),
        ],
    )


def capture_data(info: PaymentInfo, amount: int, fee_bps: int, fee_receiver: str) -> str:
    return _call(
        SEL_CAPTURE,
        [_P, "uint256", "uint16", "address"],
        [info.as_tuple(), amount, fee_bps, to_checksum_address(fee_receiver)],
    )


def void_data(info: PaymentInfo) -> str:
    return _call(SEL_VOID, [_P], [info.as_tuple()])


def reclaim_data(info: PaymentInfo) -> str:
    return _call(SEL_RECLAIM, [_P], [info.as_tuple()])


def refund_data(info: PaymentInfo, amount: int, collector: str, collector_data: bytes = b"") -> str:
    return _call(
        SEL_REFUND,
        [_P, "uint256", "address", "bytes"],
        [info.as_tuple(), amount, to_checksum_address(collector), collector_data],
    )


def get_hash_data(info: PaymentInfo) -> str:
    return _call(SEL_GET_HASH, [_P], [info.as_tuple()])


def payment_state_data(payment_hash: bytes) -> str:
    return _call(SEL_PAYMENT_STATE, ["bytes32"], [payment_hash])


@dataclass(frozen=True)
class EscrowState:
    """The escrow's ``paymentState``: has it collected, what is held, what is refundable."""

    has_collected_payment: bool
    capturable_amount: int
    refundable_amount: int


def decode_payment_state(result_hex: str) -> EscrowState:
    raw = bytes.fromhex(result_hex.removeprefix("0x"))
    collected, capturable, refundable = decode(["bool", "uint120", "uint120"], raw)
    return EscrowState(bool(collected), int(capturable), int(refundable))


# ----------------------------------------------------------------------------- revert decoding

#: Escrow custom errors → the spec's stable reasons (``simulation_failed`` when unmapped).
_ESCROW_ERRORS: dict[str, str] = {
    "AfterPreApprovalExpiry(uint48,uint48)": AUTHORIZATION_EXPIRED,
    "InvalidExpiries(uint48,uint48,uint48)": INVALID_DEADLINE_ORDERING,
    "ExceedsMaxAmount(uint256,uint256)": AMOUNT_MISMATCH,
    "PaymentAlreadyCollected(bytes32)": "payment_already_collected",
    "TokenCollectionFailed()": "token_collection_failed",
    "InvalidCollectorForOperation()": "invalid_collector",
    "InvalidSender(address,address)": "invalid_capture_authorizer",
    "ZeroAmount()": AMOUNT_MISMATCH,
    "AmountOverflow(uint256,uint256)": "amount_overflow",
    "FeeBpsOverflow(uint16)": "invalid_fee_bps",
    "InvalidFeeBpsRange(uint16,uint16)": "invalid_fee_bps_range",
    "FeeBpsOutOfRange(uint16,uint16,uint16)": "fee_bps_out_of_range",
    "ZeroFeeReceiver()": "zero_fee_receiver",
    "InvalidFeeReceiver(address,address)": "invalid_fee_receiver",
    "AfterAuthorizationExpiry(uint48,uint48)": CAPTURE_DEADLINE_EXPIRED,
    "InsufficientAuthorization(bytes32,uint256,uint256)": "insufficient_authorization",
    "ZeroAuthorization(bytes32)": "zero_authorization",
    # Not in the spec's table; stable names of our own for the remaining escrow errors.
    "BeforeAuthorizationExpiry(uint48,uint48)": "before_authorization_expiry",
    "AfterRefundExpiry(uint48,uint48)": "refund_deadline_expired",
    "RefundExceedsCapture(uint256,uint256)": "refund_exceeds_capture",
}
ESCROW_ERRORS: dict[bytes, tuple[str, str]] = {
    _selector(sig): (sig.split("(")[0], reason) for sig, reason in _ESCROW_ERRORS.items()
}


def decode_revert(data: bytes | None) -> tuple[str | None, str]:
    """(custom error name or None, stable reason) for an escrow call's revert data."""
    if data and len(data) >= 4 and data[:4] in ESCROW_ERRORS:
        name, reason = ESCROW_ERRORS[data[:4]]
        return name, reason
    return None, SIMULATION_FAILED


# ----------------------------------------------------------------------------- escrow events

_EVENT_SIGNATURES = {
    "PaymentAuthorized": f"PaymentAuthorized(bytes32,{_P},uint256,address)",
    "PaymentCharged": f"PaymentCharged(bytes32,{_P},uint256,address,uint16,address)",
    "PaymentCaptured": "PaymentCaptured(bytes32,uint256,uint16,address)",
    "PaymentVoided": "PaymentVoided(bytes32,uint256)",
    "PaymentReclaimed": "PaymentReclaimed(bytes32,uint256)",
    "PaymentRefunded": "PaymentRefunded(bytes32,uint256,address)",
}
EVENT_TOPICS: dict[str, str] = {
    "0x" + keccak(text=sig).hex(): name for name, sig in _EVENT_SIGNATURES.items()
}
#: Escrow event → the connector event it corresponds to (funds in escrow = ``payment.authorized``).
CONNECTOR_EVENTS = {
    "PaymentAuthorized": "payment.authorized",
    "PaymentCharged": "payment.charged",
    "PaymentCaptured": "payment.captured",
    "PaymentVoided": "payment.voided",
    "PaymentReclaimed": "payment.reclaimed",
    "PaymentRefunded": "payment.refunded",
}


@dataclass(frozen=True)
class EscrowEvent:
    name: str
    amount: int
    tx_hash: str
    block_number: int
    log_index: int
    fee_bps: int = 0
    fee_receiver: str | None = None

    @property
    def connector_event(self) -> str:
        return CONNECTOR_EVENTS[self.name]


def decode_escrow_log(log: dict[str, Any]) -> EscrowEvent | None:
    """One escrow log → :class:`EscrowEvent` (None for logs that are not payment events)."""
    topics = log.get("topics") or []
    name = EVENT_TOPICS.get(str(topics[0]).lower()) if topics else None
    if name is None:
        return None
    data = bytes.fromhex(str(log.get("data", "0x"))[2:])
    fee_bps, fee_receiver = 0, None
    if name == "PaymentAuthorized":
        _, amount, _ = decode([_P, "uint256", "address"], data)
    elif name == "PaymentCharged":
        _, amount, _, fee_bps, fee_receiver = decode(
            [_P, "uint256", "address", "uint16", "address"], data
        )
    elif name == "PaymentCaptured":
        amount, fee_bps, fee_receiver = decode(["uint256", "uint16", "address"], data)
    elif name == "PaymentRefunded":
        amount, _ = decode(["uint256", "address"], data)
    else:
        (amount,) = decode(["uint256"], data)
    return EscrowEvent(
        name=name,
        amount=int(amount),
        tx_hash=str(log.get("transactionHash")),
        block_number=int(str(log.get("blockNumber", "0x0")), 16),
        log_index=int(str(log.get("logIndex", "0x0")), 16),
        fee_bps=int(fee_bps),
        fee_receiver=None if fee_receiver is None else str(to_checksum_address(fee_receiver)),
    )


def state_from_events(events: list[EscrowEvent]) -> EscrowState:
    """Replay a payment's events into the state the escrow must report (a reconciliation check:
    it equals ``paymentState`` when no event was missed)."""
    collected, capturable, refundable = False, 0, 0
    for event in events:
        if event.name == "PaymentAuthorized":
            collected, capturable = True, capturable + event.amount
        elif event.name == "PaymentCharged":
            collected, refundable = True, refundable + event.amount
        elif event.name == "PaymentCaptured":
            capturable, refundable = capturable - event.amount, refundable + event.amount
        elif event.name in ("PaymentVoided", "PaymentReclaimed"):
            capturable -= event.amount
        elif event.name == "PaymentRefunded":
            refundable -= event.amount
    return EscrowState(collected, capturable, refundable)
