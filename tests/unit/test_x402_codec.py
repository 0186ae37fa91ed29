"""Wire codec: both versions round-trip, and hostile input only ever raises our typed errors."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.x402 import exact_evm
from connector.x402.codec import (
    MAX_HEADER_BYTES,
    build_payment_payload,
    decode_b64_json,
    encode_b64_json,
    parse_payment_payload,
    parse_payment_required,
    payment_header,
    payment_required_response,
    read_payment_header,
)
from connector.x402.errors import MalformedPayment, ProtocolError, UnknownNetwork, UnsupportedScheme
from connector.x402.networks import to_caip2, to_v1_name
from connector.x402.requirement import Requirement

ACCOUNT = Account.create()
REQ = Requirement(
    scheme="exact", network="eip155:84532", amount=10_000,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e", pay_to=Account.create().address,
    max_timeout_seconds=300, extra={"name": "USDC", "version": "2"},
    resource="https://api.example.com/r", description="d", mime_type="application/json",
)  # fmt: skip


def test_network_names_map_both_ways() -> None:
    assert to_caip2("base-sepolia") == "eip155:84532"
    assert to_v1_name("eip155:8453") == "base"
    assert to_caip2("eip155:31337") == "eip155:31337" and to_v1_name("eip155:31337") == "localhost"
    assert to_v1_name("eip155:999999") == "eip155:999999"  # no v1 name: CAIP-2 kept
    for bad in ("narnia", "eip155:", "eip155:abc", "eip155:0"):
        with pytest.raises(UnknownNetwork):
            to_caip2(bad)


def test_402_round_trip_prefers_v2_header_and_falls_back_to_v1_body() -> None:
    headers, body = payment_required_response(REQ, "https://x/pay", "d", None)
    offer = parse_payment_required(402, headers, json.dumps(body).encode())
    assert offer.version == 2 and offer.accepts[0].same_offer(REQ)
    v1 = parse_payment_required(402, {}, json.dumps(body).encode())
    assert v1.version == 1 and v1.accepts[0] == REQ


@pytest.mark.parametrize("version", [1, 2])
def test_payment_header_round_trip(version: int) -> None:
    payload = exact_evm.sign_exact(ACCOUNT, REQ).payload
    wire = build_payment_payload(payload, REQ, version)
    name, value = payment_header(version, wire)
    assert name == ("X-PAYMENT" if version == 1 else "PAYMENT-SIGNATURE")
    incoming = read_payment_header({name.lower(): value})
    assert incoming is not None and incoming.payer == ACCOUNT.address
    assert incoming.network == "eip155:84532" and incoming.payload == payload


def _wire(**changes: Any) -> dict[str, Any]:
    payload = exact_evm.sign_exact(ACCOUNT, REQ).payload
    wire = build_payment_payload(payload, REQ, 2)
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda w: w.update(x402Version=3), MalformedPayment),
        (lambda w: w.update(x402Version=True), MalformedPayment),
        (lambda w: w["accepted"].update(scheme="upto"), UnsupportedScheme),
        (lambda w: w["accepted"].update(network="atlantis"), UnknownNetwork),
        (lambda w: w["accepted"].update(amount=-1), MalformedPayment),
        (lambda w: w["accepted"].update(amount="1e6"), MalformedPayment),
        (lambda w: w["accepted"].update(amount=str(2**256)), MalformedPayment),
        (lambda w: w["accepted"].update(payTo="0x123"), MalformedPayment),
        (lambda w: w["payload"].update(signature="nothex"), MalformedPayment),
        (lambda w: w["payload"]["authorization"].update(nonce="0x12"), MalformedPayment),
        (lambda w: w["payload"]["authorization"].pop("from"), MalformedPayment),
        (lambda w: w["payload"]["authorization"].update(value=1.5), MalformedPayment),
        (lambda w: w.pop("payload"), MalformedPayment),
    ],
)
def test_malformed_payloads_name_the_problem(mutate: Any, error: type[Exception]) -> None:
    wire = _wire()
    mutate(wire)
    with pytest.raises(error) as info:
        parse_payment_payload(wire)
    assert info.value.field  # type: ignore[attr-defined]


def test_header_limits_and_bad_encodings() -> None:
    with pytest.raises(MalformedPayment, match="larger"):
        decode_b64_json("A" * (MAX_HEADER_BYTES + 1), "X-PAYMENT")
    for bad in (
        "not base64!!",
        base64.b64encode(b"\xff\xfe").decode(),
        base64.b64encode(b"[1]").decode(),
    ):
        with pytest.raises(MalformedPayment):
            decode_b64_json(bad, "X-PAYMENT")
    assert decode_b64_json(encode_b64_json({"a": "é"}), "h") == {"a": "é"}


def test_one_broken_option_does_not_hide_the_others() -> None:
    good = REQ.to_v2()
    doc = {"x402Version": 2, "accepts": [{**good, "network": "mars"}, {"junk": 1}, good]}
    offer = parse_payment_required(402, {"payment-required": encode_b64_json(doc)}, None)
    assert len(offer.accepts) == 1 and offer.raw_accepts == [good]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=512).map(str.encode))
def test_fuzz_402_bodies_only_raise_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_payment_required(402, {}, data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_payment_payloads_only_raise_protocol_errors(value: Any) -> None:
    v1 = {"x402Version": 1, "scheme": "exact", "network": "base", "payload": value}
    for candidate in (value, {"x402Version": 2, "accepted": value, "payload": value}, v1):
        with contextlib.suppress(ProtocolError):
            parse_payment_payload(candidate)
        with contextlib.suppress(ProtocolError):
            read_payment_header({"X-PAYMENT": encode_b64_json(candidate)})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_header_strings_only_raise_protocol_errors(value: str) -> None:
    with contextlib.suppress(ProtocolError):
        read_payment_header({"PAYMENT-SIGNATURE": value})
