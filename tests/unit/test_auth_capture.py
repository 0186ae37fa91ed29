"""authCapture protocol pieces without a chain: extra validation codes, wire round trips, salt
binding, revert decoding. Hash equality with the contract and the TS client is proven in
tests/integration/test_auth_capture_{escrow,ts_interop}.py."""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.x402 import auth_capture as ac
from connector.x402.requirement import Requirement

OPERATOR = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
RECEIVER = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def extra(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Dev USD",
        "version": "2",
        "captureAuthorizer": OPERATOR,
        "captureDeadline": 2_000_000_000,
        "refundDeadline": 2_000_003_600,
        "feeRecipient": ac.ZERO_ADDRESS,
        "minFeeBps": 0,
        "maxFeeBps": 100,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"captureAuthorizer": None}, ac.INVALID_EXTRA),
        ({"captureAuthorizer": ac.ZERO_ADDRESS}, ac.INVALID_EXTRA),
        ({"name": ""}, ac.INVALID_EXTRA),
        ({"captureDeadline": "soon"}, ac.INVALID_EXTRA),
        ({"refundDeadline": 2**48}, ac.INVALID_EXTRA),
        ({"minFeeBps": True}, ac.INVALID_EXTRA),
        ({"maxFeeBps": 10_001}, ac.INVALID_EXTRA),
        ({"minFeeBps": 200, "maxFeeBps": 100}, ac.INVALID_EXTRA),
        ({"feeRecipient": "0x1234"}, ac.INVALID_EXTRA),
        ({"assetTransferMethod": "permit3"}, ac.UNSUPPORTED_METHOD),
        ({"authCaptureEscrow": RECEIVER}, ac.INVALID_EXTRA),
        ({"serverAuthorizationRequired": "yes"}, ac.INVALID_EXTRA),
    ],
)
def test_bad_extra_is_refused_with_the_spec_code(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(ac.AuthCaptureInvalid) as caught:
        ac.parse_extra(extra(**over))
    assert caught.value.reason == reason


def test_extra_defaults_and_deployment_choice() -> None:
    parsed = ac.parse_extra(extra())
    assert parsed.deployment == ac.DEPLOYMENT_V1_1
    assert parsed.asset_transfer_method == "eip3009"
    assert not parsed.server_authorization_required and not parsed.salt_binding
    old = ac.parse_extra(extra(authCaptureEscrow=ac.DEPLOYMENT_V1_0.escrow.lower()))
    assert old.deployment == ac.DEPLOYMENT_V1_0


def test_typehash_is_the_canonical_struct_string() -> None:
    assert (
        keccak(
            b"PaymentInfo(address operator,address payer,address receiver,address token,"
            b"uint120 maxAmount,uint48 preApprovalExpiry,uint48 authorizationExpiry,"
            b"uint48 refundExpiry,uint16 minFeeBps,uint16 maxFeeBps,address feeReceiver,"
            b"uint256 salt)"
        )
        == ac.PAYMENT_INFO_TYPEHASH
    )


def test_payment_info_wire_round_trip_and_hash_sensitivity() -> None:
    info = ac.PaymentInfo(
        OPERATOR, RECEIVER, RECEIVER, TOKEN, 10**30, 1, 2, 3, 4, 5, OPERATOR, 2**255
    )
    assert ac.payment_info_from_wire(info.to_wire()) == info
    base = ac.payment_info_hash(info, chain_id=1, escrow=ac.DEPLOYMENT_V1_1.escrow)
    changed = ac.PaymentInfo(**{**info.__dict__, "max_fee_bps": 6})
    assert ac.payment_info_hash(changed, chain_id=1, escrow=ac.DEPLOYMENT_V1_1.escrow) != base
    assert ac.payment_info_hash(info, chain_id=2, escrow=ac.DEPLOYMENT_V1_1.escrow) != base
    with pytest.raises(ac.AuthCaptureInvalid):
        ac.payment_info_from_wire({**info.to_wire(), "maxAmount": str(2**120)})


def test_salt_binding_uses_the_bound_salt_and_sends_the_salt_nonce() -> None:
    payer = Account.create()
    req = Requirement(
        ac.SCHEME, "eip155:31337", 5, TOKEN, RECEIVER, 60, extra(receiverAuthorizer=RECEIVER)
    )
    payload, info = ac.sign_auth_capture(payer, req, now=1_000, salt=7)
    assert payload.salt_nonce == 7
    assert payload.salt == info.salt == ac.bound_salt(RECEIVER, ac.ZERO_ADDRESS, 7) != 7
    assert "saltNonce" in payload.to_wire()


def test_escrow_reverts_decode_to_stable_reasons() -> None:
    sel = keccak(text="FeeBpsOutOfRange(uint16,uint16,uint16)")[:4]
    assert ac.decode_revert(sel + encode(["uint16"] * 3, [1, 2, 3])) == (
        "FeeBpsOutOfRange",
        "fee_bps_out_of_range",
    )
    assert ac.decode_revert(keccak(text="ZeroAuthorization(bytes32)")[:4])[1] == (
        "zero_authorization"
    )
    assert ac.decode_revert(b"\x08\xc3\x79\xa0junk") == (None, ac.SIMULATION_FAILED)
    assert ac.decode_revert(None) == (None, ac.SIMULATION_FAILED)


_FIELDS = [f for f in ac.PaymentInfo.__dataclass_fields__ if f != "payer"]
_BITS = {"max_amount": 120, "pre_approval_expiry": 48, "authorization_expiry": 48,
         "refund_expiry": 48, "min_fee_bps": 16, "max_fee_bps": 16, "salt": 256}  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(_FIELDS), seed=st.integers(min_value=1, max_value=2**64))
def test_every_term_but_the_payer_is_bound_into_the_nonce(field: str, seed: int) -> None:
    """Changing any signed term changes the nonce (so a signature cannot be reused for other
    terms); changing only the payer does not (the nonce is payer-agnostic)."""
    info = ac.PaymentInfo(OPERATOR, RECEIVER, RECEIVER, TOKEN, 10**6, 100, 200, 300, 0, 100,
                          OPERATOR, 42)  # fmt: skip
    if field in _BITS:
        value: Any = (getattr(info, field) + seed) % 2 ** _BITS[field]
        if value == getattr(info, field):
            value = (value + 1) % 2 ** _BITS[field]
    else:
        value = Account.create(str(seed)).address
    changed = ac.PaymentInfo(**{**info.__dict__, field: value})
    nonce = ac.payer_agnostic_nonce(info, chain_id=8453, escrow=ac.DEPLOYMENT_V1_1.escrow)
    assert (
        ac.payer_agnostic_nonce(changed, chain_id=8453, escrow=ac.DEPLOYMENT_V1_1.escrow) != nonce
    )
    other_payer = ac.PaymentInfo(**{**info.__dict__, "payer": Account.create(str(seed)).address})
    assert (
        ac.payer_agnostic_nonce(other_payer, chain_id=8453, escrow=ac.DEPLOYMENT_V1_1.escrow)
        == nonce
    )
