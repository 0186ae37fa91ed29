"""Offline exact-EVM verification: each broken field is caught with its reason."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest
from eth_account import Account

from connector.x402 import exact_evm as exact
from connector.x402.requirement import Requirement

PAYER = Account.create()
REQ = Requirement(
    scheme="exact", network="eip155:84532", amount=500,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e", pay_to=Account.create().address,
    max_timeout_seconds=300, extra={"name": "USDC", "version": "2"},
)  # fmt: skip


def verify(
    payload: exact.ExactPayload, req: Requirement = REQ, **kw: object
) -> exact.VerificationResult:
    args = {"scheme": "exact", "network": req.network, "now": int(time.time()), **kw}
    return exact.verify_exact_offline(payload, req, **args)  # type: ignore[arg-type]


def test_valid_signature_passes_and_recovers_the_payer() -> None:
    result = verify(exact.sign_exact(PAYER, REQ).payload)
    assert result == exact.VerificationResult(True, None, PAYER.address)


def test_signature_matches_eth_account_typed_data_signing() -> None:
    from eth_account.messages import encode_typed_data

    payload = exact.sign_exact(PAYER, REQ).payload
    a = payload.authorization
    message = encode_typed_data(
        domain_data={
            "name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": REQ.asset
        },
        message_types={"TransferWithAuthorization": [
            {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
        ]},
        message_data={"from": a.from_, "to": a.to, "value": a.value, "validAfter": a.valid_after,
                      "validBefore": a.valid_before, "nonce": bytes.fromhex(a.nonce[2:])},
    )  # fmt: skip
    assert Account.recover_message(message, signature=payload.signature) == PAYER.address


def test_own_digest_signing_is_byte_identical_to_eth_account() -> None:
    # sign_digest replaces eth-account on the hot path: same (deterministic, RFC 6979) signature,
    # including the low-s form and v in {27, 28}, for many keys and digests.
    import secrets

    vs = set()
    for _ in range(64):
        account, digest = Account.create(), secrets.token_bytes(32)
        ours = exact.sign_digest(account.key, digest)
        assert ours == account.unsafe_sign_hash(digest).signature
        vs.add(ours[64])
    assert vs == {27, 28}


def test_a_signer_without_eth_account_signs_for_its_address() -> None:
    signer = exact.Signer(address=PAYER.address, key=bytes(PAYER.key))
    assert PAYER.key.hex() not in repr(signer) and str(PAYER.key) not in repr(signer)
    result = verify(exact.sign_exact(signer, REQ).payload)
    assert result == exact.VerificationResult(True, None, PAYER.address)


# Time-relative changes are built from the clock when the test runs, not when it is collected:
# under a slow parallel run the two can be minutes apart.
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda now: {"value": 499}, exact.VALUE_MISMATCH),
        (lambda now: {"value": 501}, exact.VALUE_MISMATCH),
        (lambda now: {"to": Account.create().address}, exact.RECIPIENT_MISMATCH),
        (lambda now: {"valid_before": now + 2}, exact.VALID_BEFORE),
        (lambda now: {"valid_after": now + 60}, exact.VALID_AFTER),
        (lambda now: {"from_": Account.create().address}, exact.BAD_SIGNATURE),
        (lambda now: {"nonce": "0x" + "11" * 32}, exact.BAD_SIGNATURE),
    ],
    ids=["value-low", "value-high", "recipient", "valid-before", "valid-after", "from", "nonce"],
)
def test_each_broken_field_has_its_reason(
    change: Callable[[int], dict[str, object]], reason: str
) -> None:
    now = int(time.time())
    payload = exact.sign_exact(PAYER, REQ).payload
    broken = dataclasses.replace(
        payload, authorization=dataclasses.replace(payload.authorization, **change(now))
    )
    assert verify(broken, now=now).reason == reason


def test_wrong_scheme_network_and_malleable_signatures() -> None:
    payload = exact.sign_exact(PAYER, REQ).payload
    assert verify(payload, scheme="upto").reason == exact.INVALID_SCHEME
    assert verify(payload, network="eip155:8453").reason == exact.NETWORK_MISMATCH
    other_chain = dataclasses.replace(REQ, network="eip155:8453")
    assert verify(payload, other_chain, network="eip155:8453").reason == exact.BAD_SIGNATURE
    sig = payload.signature
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = (
        sig[:32]
        + (n - int.from_bytes(sig[32:64], "big")).to_bytes(32, "big")
        + bytes([sig[64] ^ 1])
    )
    assert verify(dataclasses.replace(payload, signature=high_s)).reason == exact.BAD_SIGNATURE
    assert (
        verify(dataclasses.replace(payload, signature=sig + b"\x00" * 10)).reason
        == exact.UNSUPPORTED_SIGNATURE
    )


def test_fast_keccak_equals_eth_utils_keccak_for_all_lengths() -> None:
    import os

    from eth_utils.crypto import keccak

    from connector.x402.keccak import FAST, _build_fast, _build_pysha3, keccak256

    assert FAST  # a compiled path is in use here (else the bench measures the slow one)
    pysha3, cffi = _build_pysha3(), _build_fast()
    assert pysha3 is not None and cffi is not None  # both candidates exist in this install
    for n in (*range(0, 300), 1000, 4096):
        data = os.urandom(n)
        expected = keccak(data)
        assert keccak256(data) == pysha3(data) == cffi(data) == expected


def test_inline_verification_accepts_an_eth_account_typed_data_signature() -> None:
    # The hot path assembles the EIP-712 digest inline: an authorization signed by eth-account's
    # generic typed-data signer (not our digest code) must verify, and any field changed must not.
    import secrets

    from eth_account.messages import encode_typed_data

    now = int(time.time())
    auth = exact.Authorization(
        from_=PAYER.address, to=REQ.pay_to, value=REQ.amount, valid_after=0,
        valid_before=now + 300, nonce="0x" + secrets.token_hex(32),
    )  # fmt: skip
    message = encode_typed_data(
        domain_data={
            "name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": REQ.asset
        },
        message_types={"TransferWithAuthorization": [
            {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
        ]},
        message_data={"from": auth.from_, "to": auth.to, "value": auth.value,
                      "validAfter": auth.valid_after, "validBefore": auth.valid_before,
                      "nonce": bytes.fromhex(auth.nonce[2:])},
    )  # fmt: skip
    signature = bytes(Account.sign_message(message, PAYER.key).signature)
    assert verify(exact.ExactPayload(signature, auth)).is_valid
    other = dataclasses.replace(auth, valid_after=1)
    assert verify(exact.ExactPayload(signature, other)).reason == exact.BAD_SIGNATURE
    assert exact.recover_signer(
        exact.authorization_digest(
            auth, token_name="USDC", token_version="2", chain_id=84532, asset=REQ.asset
        ),
        signature,
    ) == PAYER.address
