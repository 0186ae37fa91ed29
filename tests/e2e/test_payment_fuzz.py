"""Fuzzing the payment surfaces a stranger can reach: the paywall's payment headers (X-PAYMENT,
PAYMENT-SIGNATURE) and the facilitator's /verify and /settle bodies.

Oracle: no 5xx, an answer within the client timeout (no hang), the documented shapes (problem
JSON for malformed requests, ``isValid``/``success`` false for invalid payments), and no invalid
payment ever accepted. Inputs are random bytes and JSON, and one-field mutations of a correctly
signed payment (hostile types, 2**256 - 1 and larger, NUL, deep nesting...). At the end the
untouched payment is paid once, so the oracle is shown to be able to see an acceptance.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from api.stack import Stack
from connector.x402 import codec
from connector.x402.exact_evm import (
    Authorization,
    ExactPayload,
    authorization_digest,
    sign_digest,
    sign_exact,
)
from connector.x402.networks import chain_id_of
from tests.fixtures.stack import Agent, make_agent

pytestmark = [pytest.mark.chain, pytest.mark.slow, pytest.mark.xdist_group("stack")]

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TIMEOUT = httpx.Timeout(30.0)
DEEP = "\x01"

# Every field whose change must make a payment invalid (signed, or matched against the offer).
PAYLOAD_PATHS = [
    ("x402Version",),
    ("payload", "signature"),
    ("payload", "authorization", "from"),
    ("payload", "authorization", "to"),
    ("payload", "authorization", "value"),
    ("payload", "authorization", "validAfter"),
    ("payload", "authorization", "validBefore"),
    ("payload", "authorization", "nonce"),
]
V2_PATHS = [
    *PAYLOAD_PATHS,
    ("accepted", "scheme"),
    ("accepted", "network"),
    ("accepted", "amount"),
    ("accepted", "asset"),
    ("accepted", "payTo"),
    ("accepted", "maxTimeoutSeconds"),
    ("accepted",),
    ("payload",),
    ("payload", "authorization"),
]
V1_PATHS = [*PAYLOAD_PATHS, ("scheme",), ("network",)]

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([2**256 - 1, 2**256, 2**512, -1, 0, 10**78 - 1, 2**63, 1.5, 1e308]),
    st.sampled_from([str(2**256 - 1), str(2**256), "9" * 78, "-1", "0x", "0x00", "1e3"]),
    st.sampled_from(["\x00", "a\x00b", "\u202e", "0x" + "ff" * 32, "0x" + "00" * 20]),
    st.integers(),
    st.text(max_size=80),
    st.from_regex(r"0x[0-9a-fA-F]{0,140}", fullmatch=True),
)
hostile_values = st.one_of(
    hostile_scalars,
    st.lists(hostile_scalars, max_size=3),
    st.dictionaries(st.text(max_size=8), hostile_scalars, max_size=3),
    st.integers(min_value=20, max_value=3000).map(lambda n: f"{DEEP}{n}{DEEP}"),
)
json_junk = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    """JSON text; a ``DEEP<n>DEEP`` marker string becomes ``n`` nested arrays (too deep for this
    process to build as objects, which is the point)."""
    text = json.dumps(value)
    return re.sub(
        r'"\\u0001(\d+)\\u0001"', lambda m: "[" * int(m[1]) + "]" * int(m[1]), text
    ).encode()


def _b64(value: Any) -> str:
    return base64.b64encode(_dumps(value)).decode()


def _post(url: str, body: Any) -> httpx.Response:
    return httpx.post(
        url, content=_dumps(body), headers={"content-type": "application/json"}, timeout=TIMEOUT
    )


def _set(document: Any, path: tuple[str, ...], value: Any) -> Any:
    out = copy.deepcopy(document)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _get(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        document = document[key]
    return document


def _differs(old: Any, new: Any) -> bool:
    """A mutation that normalizes back to the same value (1700 vs "1700", case of hex) is not
    one: such a payment is still correctly signed."""
    return json.dumps(old).lower().strip('"') != json.dumps(new).lower().strip('"')


class Paywall:
    def __init__(self, stack: Stack, seller: Agent) -> None:
        self.stack = stack
        offer = seller.run("receive", {"amount": "77", "resource": {"ok": True}})
        self.url: str = offer["payment_request"]["url"]
        first = httpx.get(self.url, timeout=TIMEOUT)
        assert first.status_code == 402
        self.offer = codec.parse_payment_required(402, first.headers, first.content)
        self.requirement = self.offer.accepts[0]
        self.raw_accepted = self.offer.raw_accepts[0]
        signed = sign_exact(stack.accounts[8], self.requirement)
        self.v2 = codec.build_payment_payload(
            signed.payload, self.requirement, 2, accepted_raw=self.raw_accepted
        )
        self.v1 = codec.build_payment_payload(signed.payload, self.requirement, 1)

    def pay(self, header: str, value: str) -> httpx.Response:
        return httpx.get(self.url, headers={header: value}, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def paywall(stack: Stack) -> Paywall:
    return Paywall(stack, make_agent(stack, stack.accounts[7]))


def _refused(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.status_code not in (200, 302), response.text  # never paid
    assert response.status_code in (400, 402, 410, 422), response.status_code
    assert "x-x402c-payment-id" not in response.headers


@FUZZ
@given(
    header=st.sampled_from([codec.PAYMENT_SIGNATURE, codec.X_PAYMENT]),
    value=st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
        st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
        json_junk.map(_b64),
    ),
)
def test_random_payment_headers_are_refused(paywall: Paywall, header: str, value: str) -> None:
    _refused(paywall.pay(header, value))


@FUZZ
@given(data=st.data(), version=st.sampled_from([1, 2]))
def test_mutated_payments_are_refused(paywall: Paywall, data: st.DataObject, version: int) -> None:
    valid = paywall.v2 if version == 2 else paywall.v1
    path = data.draw(st.sampled_from(V2_PATHS if version == 2 else V1_PATHS))
    new = data.draw(hostile_values)
    assume(_differs(_get(valid, path), new))
    header = codec.PAYMENT_SIGNATURE if version == 2 else codec.X_PAYMENT
    _refused(paywall.pay(header, _b64(_set(valid, path, new))))


def _facilitator_answer(response: httpx.Response, verdict: str) -> None:
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.headers["content-type"] == "application/problem+json"
        return
    body = response.json()
    assert body[verdict] is False, body  # never valid, never settled
    if verdict == "success":
        assert body["transaction"] == ""


@FUZZ
@given(
    endpoint=st.sampled_from([("verify", "isValid"), ("settle", "success")]),
    body=st.one_of(
        json_junk,
        st.fixed_dictionaries(
            {"x402Version": hostile_scalars, "paymentPayload": json_junk},
            optional={"paymentRequirements": json_junk},
        ),
    ),
)
def test_random_facilitator_bodies(paywall: Paywall, endpoint: tuple[str, str], body: Any) -> None:
    url = f"{paywall.stack.facilitator_url}/{endpoint[0]}"
    _facilitator_answer(_post(url, body), endpoint[1])


@FUZZ
@given(
    data=st.data(),
    version=st.sampled_from([1, 2]),
    endpoint=st.sampled_from([("verify", "isValid"), ("settle", "success")]),
)
def test_mutated_facilitator_requests(
    paywall: Paywall, data: st.DataObject, version: int, endpoint: tuple[str, str]
) -> None:
    valid = paywall.v2 if version == 2 else paywall.v1
    requirement = paywall.requirement.to_wire(version)
    body = {"x402Version": version, "paymentPayload": valid, "paymentRequirements": requirement}
    paths = [("paymentPayload", *p) for p in (V2_PATHS if version == 2 else V1_PATHS)]
    paths += [
        ("paymentRequirements", k) for k in ("scheme", "network", "asset", "payTo", "extra")
    ] + [("paymentRequirements", "amount" if version == 2 else "maxAmountRequired")]
    path = data.draw(st.sampled_from(paths))
    new = data.draw(hostile_values)
    assume(_differs(_get(body, path), new))
    url = f"{paywall.stack.facilitator_url}/{endpoint[0]}"
    _facilitator_answer(_post(url, _set(body, path, new)), endpoint[1])


def test_a_correctly_signed_never_expiring_authorization_pays(stack: Stack) -> None:
    """EIP-3009 lets validBefore be any uint256; 2**256 - 1 used to be a 500 (datetime range)."""
    seller = make_agent(stack, stack.accounts[6])
    paywall = Paywall(stack, seller)
    requirement = paywall.requirement
    auth = Authorization(
        from_=stack.accounts[8].address,
        to=requirement.pay_to,
        value=requirement.amount,
        valid_after=0,
        valid_before=2**256 - 1,
        nonce="0x" + secrets.token_bytes(32).hex(),
    )
    digest = authorization_digest(
        auth,
        token_name=requirement.token_name or "",
        token_version=requirement.token_version or "",
        chain_id=chain_id_of(requirement.network),
        asset=requirement.asset,
    )
    payload = ExactPayload(sign_digest(stack.accounts[8].key, digest), auth)
    wire = codec.build_payment_payload(payload, requirement, 2, accepted_raw=paywall.raw_accepted)
    response = paywall.pay(codec.PAYMENT_SIGNATURE, _b64(wire))
    assert response.status_code == 200, response.text
    payment = seller.http.get(f"/v1/admin/payments/{response.headers['x-x402c-payment-id']}").json()
    assert payment["state"] == "settled"


def test_zz_the_untouched_payment_is_accepted(paywall: Paywall) -> None:
    """The oracle can see an acceptance: the same signed payment, unmutated, pays (once)."""
    verify = httpx.post(
        f"{paywall.stack.facilitator_url}/verify",
        json={
            "x402Version": 2,
            "paymentPayload": paywall.v2,
            "paymentRequirements": paywall.requirement.to_wire(2),
        },
        timeout=TIMEOUT,
    )
    assert verify.status_code == 200 and verify.json()["isValid"] is True, verify.text
    response = paywall.pay(codec.PAYMENT_SIGNATURE, _b64(paywall.v2))
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True}
