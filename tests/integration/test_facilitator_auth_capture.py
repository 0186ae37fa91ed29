"""The local facilitator's authCapture side on anvil: the five operations end to end over HTTP
with balances read back, and verification fuzz (each broken request gets the spec's reason and
moves no money).

The session facilitator's gas key (dev account 19) is the escrow operator, so every requirement
names it as ``captureAuthorizer``.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.chain import ChainClient
from connector.chain.abi import MINT, call_data
from connector.chain.auth_capture import EscrowClient
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.local import LocalFacilitator
from connector.x402 import auth_capture as ac
from connector.x402 import exact_evm
from connector.x402.errors import ProtocolError
from connector.x402.requirement import Requirement
from tests.fixtures.escrow import approve, requirement, wall_now

pytestmark = pytest.mark.chain


def body(req: Requirement, inner: dict[str, Any], accepted: dict[str, Any] | None = None) -> Any:
    return {
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "accepted": accepted if accepted is not None else req.to_v2(),
            "payload": inner,
        },
        "paymentRequirements": req.to_v2(),
    }


class Setup:
    def __init__(self, chain: DevChainInfo, client: ChainClient, accounts: list[LocalAccount]):
        self.chain, self.client = chain, client
        self.payer, self.receiver, self.fees = accounts[1], accounts[3], accounts[4]
        self.operator = accounts[19]  # the session facilitator's gas key
        self.now = wall_now()

    def req(self, **kw: Any) -> Requirement:
        kw.setdefault("operator", self.operator.address)
        return requirement(self.chain, pay_to=self.receiver.address, now=self.now, **kw)

    def signed(self, req: Requirement, payer: LocalAccount | None = None) -> dict[str, Any]:
        payload, info = ac.sign_auth_capture(payer or self.payer, req, now=self.now)
        return {**payload.to_wire(), "paymentInfo": info.to_wire()}

    def balance(self, who: str) -> int:
        return self.client.token_balance(self.chain.token, who)


@pytest.fixture
def s(chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]) -> Setup:
    return Setup(chain, chain_client, accounts)


def test_supported_advertises_auth_capture(local_facilitator: LocalFacilitator) -> None:
    kinds = local_facilitator.supported()["kinds"]
    assert {"x402Version": 2, "scheme": "authCapture", "network": "eip155:31337"} in kinds


def test_authorize_capture_refund_void_over_http(
    s: Setup, facilitator_url: str, accounts: list[LocalAccount]
) -> None:
    req = s.req(fee_recipient=s.fees.address, min_fee_bps=50, max_fee_bps=200)
    collect = {**s.signed(req), "type": "authorize"}
    payer0, recv0, fees0 = s.balance(s.payer.address), s.balance(s.receiver.address), 0
    fees0 = s.balance(s.fees.address)

    def post(path: str, inner: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{facilitator_url}/{path}", json=body(req, inner), timeout=30)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    assert post("verify", collect) == {"isValid": True, "payer": s.payer.address}
    settled = post("settle", collect)
    assert settled["success"] is True and settled["amount"] == "1000000", settled
    assert s.balance(s.payer.address) == payer0 - 1_000_000
    # the same signature cannot collect twice
    assert post("verify", collect)["invalidReason"] == ac.INVALID_OPERATION_STATE

    terms = collect["paymentInfo"]
    for amount, bps in ((250_000, 200), (150_000, 50)):
        inner = {
            "type": "capture",
            "paymentInfo": terms,
            "amount": str(amount),
            "feeBps": bps,
            "feeRecipient": s.fees.address,
        }
        assert post("settle", inner)["success"] is True
    fee = 250_000 * 200 // 10_000 + 150_000 * 50 // 10_000
    assert s.balance(s.receiver.address) == recv0 + 400_000 - fee
    assert s.balance(s.fees.address) == fees0 + fee

    # refunds are funded by the operator through the canonical refund collector
    s.client.wait_for_receipt(
        s.client.send_transaction(
            accounts[0],
            s.chain.token,
            call_data(MINT, ["address", "uint256"], [s.operator.address, 100_000]),
        )
    )
    approve(
        s.client,
        s.chain.token,
        s.operator,
        ac.DEFAULT_DEPLOYMENT.operator_refund_collector,
        100_000,
    )
    too_much = {"type": "refund", "paymentInfo": terms, "amount": "400001"}
    assert post("verify", too_much)["invalidReason"] == ac.INVALID_OPERATION_STATE
    assert post("settle", {"type": "refund", "paymentInfo": terms, "amount": "100000"})["success"]

    voided = post("settle", {"type": "void", "paymentInfo": terms})
    assert voided["success"] is True and voided["amount"] == "600000"
    assert s.balance(s.payer.address) == payer0 - 1_000_000 + 100_000 + 600_000
    info = ac.payment_info_from_wire(terms)
    assert EscrowClient(s.client).state(info) == ac.EscrowState(True, 0, 300_000)
    assert post("verify", {"type": "void", "paymentInfo": terms})["invalidReason"] == (
        ac.INVALID_OPERATION_STATE
    )


def test_charge_pays_receiver_and_fee_at_once(
    s: Setup, local_facilitator: LocalFacilitator
) -> None:
    req = s.req(max_fee_bps=1_000)
    inner = {
        **s.signed(req),
        "type": "charge",
        "capture": {"amount": "1000000", "feeBps": 1_000, "feeRecipient": s.fees.address},
    }
    before = [s.balance(a) for a in (s.payer.address, s.receiver.address, s.fees.address)]
    result = local_facilitator.settle(body(req, inner))
    assert result["success"] is True, result
    assert [s.balance(a) for a in (s.payer.address, s.receiver.address, s.fees.address)] == [
        before[0] - 1_000_000,
        before[1] + 900_000,
        before[2] + 100_000,
    ]


# ------------------------------------------------------------------------------ fuzz


def _resign_with_nonce(s: Setup, req: Requirement, inner: dict[str, Any], nonce: str) -> None:
    auth = exact_evm.Authorization(
        **{**ac.parse_client_payload(inner).authorization.__dict__, "nonce": nonce}
    )
    digest = ac.receive_digest(
        auth,
        token_name=s.chain.token_name,
        token_version=s.chain.token_version,
        chain_id=s.chain.chain_id,
        asset=s.chain.token,
    )
    inner["authorization"] = auth.to_wire()
    inner["signature"] = "0x" + exact_evm.sign_digest(s.payer.key, digest).hex()


Mutation = Callable[[Setup, Requirement, dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutation:
    def mutate(s: Setup, req: Requirement, inner: dict[str, Any]) -> None:
        node = inner
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value(s) if callable(value) else value

    return mutate


FUZZ: list[tuple[str, Mutation, str]] = [
    ("unknown type", _set("type", "steal"), ac.INVALID_OPERATION_TYPE),
    ("no signature", lambda s, r, i: i.pop("signature"), ac.INVALID_PAYLOAD_FORMAT),
    (
        "receiver swapped",
        _set("paymentInfo.receiver", lambda s: s.fees.address),
        ac.PAYMENT_INFO_MISMATCH,
    ),
    (
        "operator swapped",
        _set("paymentInfo.operator", lambda s: s.payer.address),
        ac.PAYMENT_INFO_MISMATCH,
    ),
    ("maxAmount raised", _set("paymentInfo.maxAmount", "1000001"), ac.PAYMENT_INFO_MISMATCH),
    ("fee cap raised", _set("paymentInfo.maxFeeBps", 9_000), ac.PAYMENT_INFO_MISMATCH),
    ("refund window stretched", _set("paymentInfo.refundExpiry", 2**40), ac.PAYMENT_INFO_MISMATCH),
    ("salt swapped", _set("paymentInfo.salt", "0x" + "11" * 32), ac.PAYMENT_INFO_MISMATCH),
    ("preApprovalExpiry moved", _set("paymentInfo.preApprovalExpiry", 1), ac.PAYMENT_INFO_MISMATCH),
    (
        "wrong collector (v1.0 for a v1.1 escrow)",
        _set("authorization.to", ac.DEPLOYMENT_V1_0.eip3009_collector),
        ac.TOKEN_COLLECTOR_MISMATCH,
    ),
    (
        "signed by someone else",
        _set("signature", lambda s: "0x" + exact_evm.sign_digest(s.fees.key, b"\x01" * 32).hex()),
        ac.INVALID_SIGNATURE,
    ),
    (
        "nonce not the terms' hash",
        lambda s, r, i: _resign_with_nonce(s, r, i, "0x" + secrets.token_hex(32)),
        ac.NONCE_MISMATCH,
    ),
]


@pytest.mark.parametrize(
    ("mutation", "reason"), [(m, r) for _, m, r in FUZZ], ids=[name for name, _, _ in FUZZ]
)
def test_broken_authorize_is_refused_with_the_spec_reason_and_moves_nothing(
    s: Setup, local_facilitator: LocalFacilitator, mutation: Mutation, reason: str
) -> None:
    req = s.req(max_fee_bps=100)
    inner = {**s.signed(req), "type": "authorize"}
    inner = copy.deepcopy(inner)
    mutation(s, req, inner)
    payer_before = s.balance(s.payer.address)
    verdict = local_facilitator.verify(body(req, inner))
    assert verdict["isValid"] is False and verdict["invalidReason"] == reason, verdict
    settled = local_facilitator.settle(body(req, inner))
    assert settled["success"] is False and settled["errorReason"] == reason
    assert settled["transaction"] == ""
    assert s.balance(s.payer.address) == payer_before


def test_deadlines_and_time_window(s: Setup, local_facilitator: LocalFacilitator) -> None:
    req = s.req(capture_in=3_600, max_timeout_seconds=300)
    inner = {**s.signed(req), "type": "authorize"}
    fac = local_facilitator.scheme_handlers["authCapture"]
    valid_before = int(inner["authorization"]["validBefore"])
    assert fac.verify(body(req, inner), now=s.now)["isValid"] is True
    assert fac.verify(body(req, inner), now=valid_before - 6)["invalidReason"] == (
        ac.AUTHORIZATION_EXPIRED
    )
    assert fac.verify(body(req, inner), now=s.now + 3_600)["invalidReason"] == (
        ac.CAPTURE_DEADLINE_EXPIRED
    )
    # the signature must not outlive the capture deadline
    late = s.req(capture_in=100, refund_in=200, max_timeout_seconds=300)
    assert (
        local_facilitator.verify(body(late, {**s.signed(late), "type": "authorize"}))[
            "invalidReason"
        ]
        == ac.INVALID_DEADLINE_ORDERING
    )


def test_requirement_level_refusals(
    s: Setup, local_facilitator: LocalFacilitator, accounts: list[LocalAccount]
) -> None:
    good = s.req(max_fee_bps=100)
    inner = {**s.signed(good), "type": "authorize"}
    # fee bounds the extra itself breaks
    bad_fees = Requirement(**{**good.__dict__, "extra": {**good.extra, "minFeeBps": 200}})
    assert local_facilitator.verify(body(bad_fees, inner))["invalidReason"] == ac.INVALID_EXTRA
    # accepted on another scheme / network
    other = {**good.to_v2(), "scheme": "exact"}
    assert local_facilitator.verify(body(good, inner, other))["invalidReason"] == (
        ac.UNSUPPORTED_SCHEME
    )
    elsewhere = {**good.to_v2(), "network": "eip155:8453"}
    assert local_facilitator.verify(body(good, inner, elsewhere))["invalidReason"] == (
        ac.NETWORK_MISMATCH
    )
    # a payer without funds
    broke = accounts[12]
    poor = {**s.signed(good, payer=broke), "type": "authorize"}
    assert local_facilitator.verify(body(good, poor))["invalidReason"] == ac.INSUFFICIENT_BALANCE
    # terms naming another operator: the escrow refuses our gas key (decoded simulation revert)
    foreign = s.req(operator=accounts[2].address)
    inner_foreign = {**s.signed(foreign), "type": "authorize"}
    assert local_facilitator.verify(body(foreign, inner_foreign))["invalidReason"] == (
        "invalid_capture_authorizer"
    )
    # capture and fee rules on an authorized payment (decoded from the simulation)
    assert local_facilitator.settle(body(good, inner))["success"] is True
    terms = inner["paymentInfo"]
    cases = {
        "fee_bps_out_of_range": {"amount": "10", "feeBps": 101, "feeRecipient": s.fees.address},
        "zero_fee_receiver": {"amount": "10", "feeBps": 100},
        ac.INVALID_OPERATION_STATE: {"amount": "1000001"},
    }
    for reason, fields in cases.items():
        capture = {"type": "capture", "paymentInfo": terms, **fields}
        assert local_facilitator.verify(body(good, capture))["invalidReason"] == reason, reason


def test_server_authorization_when_required(s: Setup, local_facilitator: LocalFacilitator) -> None:
    base = s.req()
    req = Requirement(
        **{**base.__dict__, "extra": {**base.extra, "serverAuthorizationRequired": True}}
    )
    inner = {**s.signed(req), "type": "authorize"}
    assert local_facilitator.verify(body(req, inner))["invalidReason"] == (
        ac.MISSING_SERVER_AUTHORIZATION
    )
    nonce = inner["authorization"]["nonce"]
    escrow = ac.DEFAULT_DEPLOYMENT.escrow
    forged = ac.sign_server_authorization(s.fees, nonce, chain_id=s.chain.chain_id, escrow=escrow)
    assert (
        local_facilitator.verify(body(req, {**inner, "serverAuthorization": forged}))[
            "invalidReason"
        ]
        == ac.INVALID_SERVER_AUTHORIZATION
    )
    proof = ac.sign_server_authorization(
        s.receiver, nonce, chain_id=s.chain.chain_id, escrow=escrow
    )
    assert (
        local_facilitator.verify(body(req, {**inner, "serverAuthorization": proof}))["isValid"]
        is True
    )


def test_malformed_envelope_is_http_400(facilitator_url: str) -> None:
    response = httpx.post(
        f"{facilitator_url}/verify",
        json={
            "paymentPayload": {"x402Version": 2, "payload": {}},
            "paymentRequirements": {"scheme": "authCapture"},
        },
        timeout=10,
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


def test_racing_captures_of_the_last_held_amount_settle_once(
    s: Setup, local_facilitator: LocalFacilitator
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    req = s.req()
    inner = {**s.signed(req), "type": "authorize"}
    assert local_facilitator.settle(body(req, inner))["success"] is True
    capture = {"type": "capture", "paymentInfo": inner["paymentInfo"], "amount": "1000000"}
    receiver_before = s.balance(s.receiver.address)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: local_facilitator.settle(body(req, capture)), range(4)))
    assert sum(1 for r in results if r["success"]) == 1, results
    # the losers were stopped before broadcasting (serialized per payment), not reverted on-chain
    assert {r.get("errorReason") for r in results if not r["success"]} == {
        ac.INVALID_OPERATION_STATE
    }
    assert all(r["transaction"] == "" for r in results if not r["success"])
    assert s.balance(s.receiver.address) == receiver_before + 1_000_000


@pytest.mark.parametrize("auto_capture", [False, True])
def test_payload_without_type_follows_auto_capture(
    s: Setup, local_facilitator: LocalFacilitator, auto_capture: bool
) -> None:
    """The spec's earlier form: no ``type``; ``extra.autoCapture`` picks charge or authorize."""
    base = s.req(fee_recipient=s.fees.address, min_fee_bps=100, max_fee_bps=100)
    req = Requirement(**{**base.__dict__, "extra": {**base.extra, "autoCapture": auto_capture}})
    payload, info = ac.sign_auth_capture(s.payer, req, now=s.now)
    receiver_before = s.balance(s.receiver.address)
    result = local_facilitator.settle(body(req, payload.to_wire()))
    assert result["success"] is True, result
    assert result["operation"] == ("charge" if auto_capture else "authorize")
    state = EscrowClient(s.client).state(info)
    if auto_capture:
        assert state == ac.EscrowState(True, 0, 1_000_000)
        assert s.balance(s.receiver.address) == receiver_before + 990_000
    else:
        assert state == ac.EscrowState(True, 1_000_000, 0)
        assert s.balance(s.receiver.address) == receiver_before


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.text(max_size=12),
    st.sampled_from(["9" * 5000, "0x" + "f" * 70, "0x" + "0" * 40, "-1", "1e9", "0x"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
_PATHS = [
    "type", "signature", "salt", "saltNonce", "authorization", "authorization.from",
    "authorization.to", "authorization.value", "authorization.validAfter",
    "authorization.validBefore", "authorization.nonce", "paymentInfo", "paymentInfo.payer",
    "paymentInfo.maxAmount", "paymentInfo.salt", "paymentInfo.refundExpiry", "capture",
    "capture.amount", "capture.feeBps", "capture.feeRecipient", "amount", "feeBps",
    "feeRecipient", "serverAuthorization",
]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    op=st.sampled_from(ac.OPERATIONS),
    edits=st.lists(st.tuples(st.sampled_from(_PATHS), _JUNK), min_size=1, max_size=3),
)
def test_hostile_payloads_get_a_reason_never_a_crash(
    devchain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
    local_facilitator: LocalFacilitator,
    op: str,
    edits: list[tuple[str, Any]],
) -> None:
    s = Setup(devchain, chain_client, accounts)
    req = s.req()
    inner: dict[str, Any] = {**s.signed(req), "type": op, "capture": {"amount": "1"}}
    for path, value in edits:
        node: Any = inner
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = value
    try:
        verdict = local_facilitator.verify(body(req, inner))
    except ProtocolError:
        return  # a malformed envelope: HTTP 400 at the edge
    assert isinstance(verdict["isValid"], bool)
    if not verdict["isValid"]:
        assert isinstance(verdict["invalidReason"], str) and verdict["invalidReason"]


@pytest.mark.parametrize("field", ["amount", "feeBps"])
def test_a_huge_number_string_is_a_format_error_not_a_crash(
    s: Setup, local_facilitator: LocalFacilitator, field: str
) -> None:
    """Regression: int() of a >4300-digit string raises ValueError in Python 3.11."""
    req = s.req()
    inner = {**s.signed(req), "type": "authorize"}
    assert local_facilitator.settle(body(req, inner))["success"] is True
    capture = {
        "type": "capture",
        "paymentInfo": inner["paymentInfo"],
        "amount": "1",
        field: "9" * 5000,
    }
    verdict = local_facilitator.verify(body(req, capture))
    assert verdict["invalidReason"] == ac.INVALID_PAYLOAD_FORMAT


def test_an_asset_that_is_not_a_token_is_refused_cleanly(
    s: Setup, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    from connector.facilitator.auth_capture import AuthCaptureFacilitator

    open_facilitator = AuthCaptureFacilitator(chain_client, s.operator, network=s.chain.network)
    base = s.req()
    req = Requirement(**{**base.__dict__, "asset": accounts[6].address})  # an EOA, no code
    verdict = open_facilitator.verify(body(req, {**s.signed(req), "type": "authorize"}))
    assert verdict["invalidReason"] == ac.TOKEN_MISMATCH


def test_a_chain_without_the_escrow_is_refused_not_reported_as_settled(
    s: Setup, local_facilitator: LocalFacilitator
) -> None:
    """A call to an address without code succeeds doing nothing; the facilitator must notice."""
    from connector.facilitator.auth_capture import ESCROW_NOT_DEPLOYED, AuthCaptureFacilitator

    req = s.req()
    inner = {**s.signed(req), "type": "authorize"}
    fresh = AuthCaptureFacilitator(s.client, s.operator, network=s.chain.network)
    s.client.rpc("anvil_setCode", [ac.DEFAULT_DEPLOYMENT.escrow, "0x"])  # reverted by `chain`
    payer_before = s.balance(s.payer.address)
    assert fresh.verify(body(req, inner))["invalidReason"] == ESCROW_NOT_DEPLOYED
    settled = fresh.settle(body(req, inner))
    assert settled["success"] is False and settled["transaction"] == ""
    assert s.balance(s.payer.address) == payer_before


def test_an_escrow_operation_is_pending_until_its_confirmations(
    s: Setup, chain_client: ChainClient
) -> None:
    """As for ``exact`` transfers: on a network that needs 3 confirmations, a mined authorize is
    reported ``settlement_pending`` with its transaction (never success, never failure) until its
    block is 3 deep; once blocks follow, the same kind of settle answers success."""
    import threading

    from connector.facilitator.auth_capture import SETTLEMENT_PENDING, AuthCaptureFacilitator

    def facilitator(timeout_s: float) -> AuthCaptureFacilitator:
        return AuthCaptureFacilitator(
            chain_client, s.operator, network=s.chain.network, receipt_timeout_s=timeout_s,
            confirmations=3,
        )  # fmt: skip

    payer0 = s.balance(s.payer.address)
    req = s.req()
    shallow = facilitator(1.0).settle(body(req, {**s.signed(req), "type": "authorize"}))
    assert shallow["success"] is False and shallow["errorReason"] == SETTLEMENT_PENDING, shallow
    mined = chain_client.get_receipt(shallow["transaction"])
    assert mined is not None and mined.status == 1  # it happened: only not deep enough yet
    assert s.balance(s.payer.address) == payer0 - 1_000_000

    req = s.req()
    stop = threading.Event()

    def mine() -> None:  # blocks keep coming, whenever the settle's transaction lands
        while not stop.wait(0.3):
            chain_client.rpc("anvil_mine", ["0x1"])

    miner = threading.Thread(target=mine, daemon=True)
    miner.start()
    try:
        deep = facilitator(30.0).settle(body(req, {**s.signed(req), "type": "authorize"}))
    finally:
        stop.set()
        miner.join(5)
    assert deep["success"] is True, deep
    receipt = chain_client.get_receipt(deep["transaction"])
    assert receipt is not None and chain_client.block_number() - receipt.block_number + 1 >= 3
