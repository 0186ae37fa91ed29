"""The ``exact`` scheme on EVM: EIP-3009 ``TransferWithAuthorization`` signing and verification.

Verification is written for speed: the EIP-712 digest is assembled from cached pieces (type hash,
per-token domain separator) and the signer is recovered with ``coincurve`` directly, skipping
eth-account's generic typed-data machinery (about 2.5x the throughput on one core; see
``bench/bench_verify.py`` and docs/decisions/0001-own-exact-evm-verifier.md).

Check order (first failure wins, reasons are the official Python SDK's strings so peers that
match on them keep working): scheme, network, asset, recipient, amount (exactly equal), time
window, signature, then on-chain: nonce unused, balance sufficient.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from coincurve import PrivateKey, PublicKey
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from connector.x402 import fields as f
from connector.x402.errors import MalformedPayment
from connector.x402.networks import chain_id_of
from connector.x402.requirement import Requirement

# Reason strings (one documented set: the official Python SDK's).
INVALID_SCHEME = "unsupported_scheme"
NETWORK_MISMATCH = "network_mismatch"
ASSET_MISMATCH = "invalid_exact_evm_asset_mismatch"
RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
BAD_SIGNATURE = "invalid_exact_evm_payload_signature"
UNSUPPORTED_SIGNATURE = "invalid_exact_evm_unsupported_signature"
NONCE_USED = "invalid_exact_evm_nonce_already_used"
INSUFFICIENT_FUNDS = "invalid_exact_evm_insufficient_balance"
MISSING_DOMAIN = "invalid_exact_evm_failed_to_get_asset_info"

#: A payment must stay valid at least this long so settlement can land before the deadline.
SETTLEMENT_MARGIN_S = 6
#: validAfter is backdated to tolerate payer/server clock skew (as the TypeScript client does).
CLOCK_SKEW_S = 600

_TRANSFER_TYPEHASH = keccak(
    text="TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


@dataclass(frozen=True)
class Authorization:
    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str  # 0x + 64 hex

    def to_wire(self) -> dict[str, str]:
        return {
            "from": self.from_,
            "to": self.to,
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": self.nonce,
        }


@dataclass(frozen=True)
class ExactPayload:
    signature: bytes
    authorization: Authorization

    def to_wire(self) -> dict[str, Any]:
        return {
            "signature": "0x" + self.signature.hex(),
            "authorization": self.authorization.to_wire(),
        }


def parse_exact_payload(data: Any, where: str = "payload") -> ExactPayload:
    d = f.obj(data, where)
    auth = f.obj(d.get("authorization"), f"{where}.authorization")
    w = f"{where}.authorization"
    return ExactPayload(
        signature=f.hex_bytes(d, "signature", where),
        authorization=Authorization(
            from_=f.address(auth, "from", w),
            to=f.address(auth, "to", w),
            value=f.uint_string(auth, "value", w),
            valid_after=f.uint_string(auth, "validAfter", w),
            valid_before=f.uint_string(auth, "validBefore", w),
            nonce=f.bytes32(auth, "nonce", w),
        ),
    )


@lru_cache(maxsize=1024)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                _DOMAIN_TYPEHASH,
                keccak(text=name),
                keccak(text=version),
                chain_id,
                to_checksum_address(verifying_contract),
            ],
        )
    )


def authorization_digest(
    auth: Authorization, *, token_name: str, token_version: str, chain_id: int, asset: str
) -> bytes:
    struct_hash = keccak(
        _TRANSFER_TYPEHASH
        + bytes(12)
        + bytes.fromhex(auth.from_[2:])
        + bytes(12)
        + bytes.fromhex(auth.to[2:])
        + auth.value.to_bytes(32, "big")
        + auth.valid_after.to_bytes(32, "big")
        + auth.valid_before.to_bytes(32, "big")
        + bytes.fromhex(auth.nonce[2:])
    )
    separator = domain_separator(token_name, token_version, chain_id, asset)
    return keccak(b"\x19\x01" + separator + struct_hash)


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """Address that produced a 65-byte ECDSA signature over ``digest``; None when invalid."""
    if len(signature) != 65:
        return None
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        return None
    if int.from_bytes(signature[32:64], "big") > _SECP256K1_HALF_N:
        return None  # malleable high-s copy; tokens refuse these on-chain too
    try:
        public = PublicKey.from_signature_and_message(
            signature[:64] + bytes([v]), digest, hasher=None
        )
    except Exception:  # coincurve raises plain Exception on invalid points
        return None
    raw = public.format(compressed=False)[1:]
    return str(to_checksum_address(keccak(raw)[-20:]))


# ------------------------------------------------------------------------------ signing


@dataclass(frozen=True)
class SignedExact:
    payload: ExactPayload

    @property
    def nonce(self) -> str:
        return self.payload.authorization.nonce

    @property
    def valid_before(self) -> int:
        return self.payload.authorization.valid_before


class SigningKey(Protocol):
    """A private key and the address it controls: eth-account's ``LocalAccount`` or a
    :class:`Signer`."""

    @property
    def address(self) -> str: ...

    @property
    def key(self) -> bytes: ...


@dataclass(frozen=True)
class Signer:
    """The least a signer needs. Building an eth-account ``LocalAccount`` derives the public key
    and its address again (about 0.1 ms) although the connection already stores the address."""

    address: str
    key: bytes = field(repr=False)


def sign_digest(key: bytes, digest: bytes) -> bytes:
    """65-byte Ethereum signature ``r || s || v`` (v = 27 or 28, low s) of a 32-byte digest."""
    raw = PrivateKey(bytes(key)).sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def sign_exact(
    account: SigningKey, requirement: Requirement, *, now: int | None = None
) -> SignedExact:
    """Sign a fresh authorization paying exactly ``requirement.amount`` to ``pay_to``."""
    if requirement.scheme != "exact":
        raise MalformedPayment(f"cannot sign scheme {requirement.scheme!r}", field="scheme")
    if not requirement.token_name or not requirement.token_version:
        raise MalformedPayment(
            "requirement.extra must carry the token's EIP-712 name and version", field="extra"
        )
    now = int(time.time()) if now is None else now
    auth = Authorization(
        from_=account.address,
        to=requirement.pay_to,
        value=requirement.amount,
        valid_after=max(0, now - CLOCK_SKEW_S),
        valid_before=now + requirement.max_timeout_seconds,
        nonce="0x" + secrets.token_bytes(32).hex(),
    )
    digest = authorization_digest(
        auth,
        token_name=requirement.token_name,
        token_version=requirement.token_version,
        chain_id=chain_id_of(requirement.network),
        asset=requirement.asset,
    )
    return SignedExact(ExactPayload(sign_digest(account.key, digest), auth))


# ------------------------------------------------------------------------------ verification


class TokenStateReader(Protocol):
    def balance_of(self, asset: str, owner: str) -> int: ...

    def authorization_used(self, asset: str, authorizer: str, nonce: str) -> bool: ...


@dataclass(frozen=True)
class VerificationResult:
    is_valid: bool
    reason: str | None
    payer: str | None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"isValid": self.is_valid}
        if self.reason:
            out["invalidReason"] = self.reason
        if self.payer:
            out["payer"] = self.payer
        return out


def verify_exact_offline(
    payload: ExactPayload,
    requirement: Requirement,
    *,
    scheme: str,
    network: str,
    now: int | None = None,
) -> VerificationResult:
    """Everything that needs no chain access. ``scheme``/``network`` are what the payer claims."""
    auth = payload.authorization
    payer = auth.from_
    now = int(time.time()) if now is None else now

    def bad(reason: str) -> VerificationResult:
        return VerificationResult(False, reason, payer)

    if scheme != "exact" or requirement.scheme != "exact":
        return bad(INVALID_SCHEME)
    if network != requirement.network:
        return bad(NETWORK_MISMATCH)
    if auth.to.lower() != requirement.pay_to.lower():
        return bad(RECIPIENT_MISMATCH)
    if auth.value != requirement.amount:
        return bad(VALUE_MISMATCH)
    if auth.valid_before < now + SETTLEMENT_MARGIN_S:
        return bad(VALID_BEFORE)
    if auth.valid_after > now:
        return bad(VALID_AFTER)
    if not requirement.token_name or not requirement.token_version:
        return bad(MISSING_DOMAIN)
    if len(payload.signature) != 65:
        return bad(UNSUPPORTED_SIGNATURE)
    digest = authorization_digest(
        auth,
        token_name=requirement.token_name,
        token_version=requirement.token_version,
        chain_id=chain_id_of(requirement.network),
        asset=requirement.asset,
    )
    if recover_signer(digest, payload.signature) != payer:
        return bad(BAD_SIGNATURE)
    return VerificationResult(True, None, payer)


def verify_exact(
    payload: ExactPayload,
    requirement: Requirement,
    reader: TokenStateReader,
    *,
    scheme: str,
    network: str,
    asset: str | None = None,
    now: int | None = None,
) -> VerificationResult:
    """Offline checks, then the chain: nonce unused and balance sufficient."""
    if asset is not None and asset.lower() != requirement.asset.lower():
        return VerificationResult(False, ASSET_MISMATCH, payload.authorization.from_)
    result = verify_exact_offline(payload, requirement, scheme=scheme, network=network, now=now)
    if not result.is_valid:
        return result
    auth = payload.authorization
    both = getattr(reader, "authorization_and_balance", None)
    if callable(both):  # one round trip when the reader can batch
        used, balance = both(requirement.asset, auth.from_, auth.nonce)
    else:
        used = reader.authorization_used(requirement.asset, auth.from_, auth.nonce)
        balance = None if used else reader.balance_of(requirement.asset, auth.from_)
    if used:
        return VerificationResult(False, NONCE_USED, auth.from_)
    if balance is not None and balance < auth.value:
        return VerificationResult(False, INSUFFICIENT_FUNDS, auth.from_)
    return result
