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
import threading
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
from connector.x402.keccak import keccak256
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


_PAD12 = bytes(12)
_HALF_N_BYTES = _SECP256K1_HALF_N.to_bytes(32, "big")
_chain_id = lru_cache(maxsize=256)(chain_id_of)


def authorization_digest(
    auth: Authorization, *, token_name: str, token_version: str, chain_id: int, asset: str
) -> bytes:
    """The EIP-712 digest the payer signs. One join and two keccaks: the type hash and the
    token's domain separator are precomputed, and no ABI encoder runs per call."""
    struct_hash = keccak256(
        b"".join(
            (
                _TRANSFER_TYPEHASH,
                _PAD12,
                bytes.fromhex(auth.from_[2:]),
                _PAD12,
                bytes.fromhex(auth.to[2:]),
                auth.value.to_bytes(32, "big"),
                auth.valid_after.to_bytes(32, "big"),
                auth.valid_before.to_bytes(32, "big"),
                bytes.fromhex(auth.nonce[2:]),
            )
        )
    )
    separator = domain_separator(token_name, token_version, chain_id, asset)
    return keccak256(b"\x19\x01" + separator + struct_hash)


def _recover_public_portable(signature64: bytes, recid: int, digest: bytes) -> bytes | None:
    try:
        public = PublicKey.from_signature_and_message(
            signature64 + bytes((recid,)), digest, hasher=None
        )
    except Exception:  # coincurve raises plain Exception on invalid points
        return None
    return public.format(compressed=False)


def _build_direct_recover() -> Any:
    """Recovery straight through libsecp256k1's cffi functions with per-thread buffers.

    ``PublicKey.from_signature_and_message`` allocates three cffi objects and a ``PublicKey`` per
    call, and ``format`` two more; going to the library directly does the same three C calls
    without them. Falls back to the public API when coincurve's internals look different."""
    try:
        from coincurve._libsecp256k1 import ffi, lib
        from coincurve.context import GLOBAL_CONTEXT
    except ImportError:
        return None
    ctx = GLOBAL_CONTEXT.ctx
    local = threading.local()
    uncompressed = 1 << 1  # SECP256K1_FLAGS_TYPE_COMPRESSION without the compressed bit

    def buffers() -> Any:
        b = getattr(local, "b", None)
        if b is None:
            b = (
                ffi.new("secp256k1_ecdsa_recoverable_signature *"),
                ffi.new("secp256k1_pubkey *"),
                ffi.new("unsigned char[65]"),
                ffi.new("size_t *"),
            )
            local.b = b
        return b

    parse = lib.secp256k1_ecdsa_recoverable_signature_parse_compact
    recover = lib.secp256k1_ecdsa_recover
    serialize = lib.secp256k1_ec_pubkey_serialize
    unpack = ffi.unpack

    def recover_public(signature64: bytes, recid: int, digest: bytes) -> bytes | None:
        sig, pub, out, out_len = getattr(local, "b", None) or buffers()
        if not parse(ctx, sig, signature64, recid) or not recover(ctx, pub, sig, digest):
            return None
        out_len[0] = 65
        serialize(ctx, out, out_len, pub, uncompressed)
        return bytes(unpack(out, 65))

    try:  # self-check against the public API once
        probe = PrivateKey(b"\x01" * 32)
        digest = bytes(range(32))
        raw = probe.sign_recoverable(digest, hasher=None)
        if recover_public(raw[:64], raw[64], digest) != probe.public_key.format(compressed=False):
            return None
    except Exception:
        return None
    return recover_public


_recover_public = _build_direct_recover() or _recover_public_portable


def _recover_raw(digest: bytes, signature: bytes) -> bytes | None:
    """The 20 address bytes that produced a 65-byte signature over ``digest``; None if invalid."""
    if len(signature) != 65 or len(digest) != 32:
        return None
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        return None
    if signature[32:64] > _HALF_N_BYTES:  # equal-length big-endian: byte order is numeric order
        return None  # malleable high-s copy; tokens refuse these on-chain too
    public = _recover_public(signature[:64], v, digest)
    if public is None:
        return None
    return keccak256(public[1:])[-20:]


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """Address that produced a 65-byte ECDSA signature over ``digest``; None when invalid."""
    raw = _recover_raw(digest, signature)
    return None if raw is None else str(to_checksum_address(raw))


def signed_by(digest: bytes, signature: bytes, address: str) -> bool:
    """Whether ``address`` (0x + 40 hex, any case) signed ``digest``. Compares raw bytes, so the
    hot path computes no checksum address (that alone cost ~18 µs per verification)."""
    raw = _recover_raw(digest, signature)
    return raw is not None and raw == bytes.fromhex(address[2:])


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
    """Everything that needs no chain access. ``scheme``/``network`` are what the payer claims.

    This is the hot path of every verification (our facilitator's and the paywall's), so the
    digest is assembled inline rather than through :func:`authorization_digest` (same bytes; a
    unit test compares them) and the signer is compared as raw bytes."""
    auth = payload.authorization
    payer = auth.from_
    now = int(time.time()) if now is None else now
    reason: str | None = None
    extra = requirement.extra
    name, version = extra.get("name"), extra.get("version")
    if scheme != "exact" or requirement.scheme != "exact":
        reason = INVALID_SCHEME
    elif network != requirement.network:
        reason = NETWORK_MISMATCH
    elif auth.to.lower() != requirement.pay_to.lower():
        reason = RECIPIENT_MISMATCH
    elif auth.value != requirement.amount:
        reason = VALUE_MISMATCH
    elif auth.valid_before < now + SETTLEMENT_MARGIN_S:
        reason = VALID_BEFORE
    elif auth.valid_after > now:
        reason = VALID_AFTER
    elif not (name and version and isinstance(name, str) and isinstance(version, str)):
        reason = MISSING_DOMAIN
    elif len(payload.signature) != 65:
        reason = UNSUPPORTED_SIGNATURE
    else:
        separator = domain_separator(name, version, _chain_id(network), requirement.asset)
        struct_hash = keccak256(
            b"".join(
                (
                    _TRANSFER_TYPEHASH,
                    _PAD12,
                    bytes.fromhex(payer[2:]),
                    _PAD12,
                    bytes.fromhex(auth.to[2:]),
                    auth.value.to_bytes(32, "big"),
                    auth.valid_after.to_bytes(32, "big"),
                    auth.valid_before.to_bytes(32, "big"),
                    bytes.fromhex(auth.nonce[2:]),
                )
            )
        )
        digest = keccak256(b"\x19\x01" + separator + struct_hash)
        if _recover_raw(digest, payload.signature) != bytes.fromhex(payer[2:]):
            reason = BAD_SIGNATURE
    return VerificationResult(reason is None, reason, payer)


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
