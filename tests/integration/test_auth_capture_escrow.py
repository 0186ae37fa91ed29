"""Our dev-chain AuthCaptureEscrow + collectors on real anvil, balances read back on-chain.

Payers sign exactly as clients do for mainnet (canonical escrow and collector addresses), so
these also prove our runtime code answers at those addresses and hashes terms byte for byte.
"""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.chain.auth_capture import EscrowClient
from connector.devchain.deploy import DevChainInfo
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import approve, chain_now, requirement, travel

pytestmark = pytest.mark.chain


class Parties:
    def __init__(self, accounts: list[LocalAccount]) -> None:
        self.payer = accounts[1]
        self.operator = accounts[2]
        self.receiver = accounts[3]
        self.fees = accounts[4]
        self.outsider = accounts[5]


@pytest.fixture
def parties(accounts: list[LocalAccount]) -> Parties:
    return Parties(accounts)


def balances(client: ChainClient, chain: DevChainInfo, *who: str) -> list[int]:
    return [client.token_balance(chain.token, a) for a in who]


def signed_terms(
    chain: DevChainInfo, client: ChainClient, p: Parties, **kw: object
) -> tuple[ac.PaymentInfo, bytes, ac.Deployment]:
    now = chain_now(client)
    req = requirement(
        chain,
        operator=p.operator.address,
        pay_to=p.receiver.address,
        now=now,
        **kw,  # type: ignore[arg-type]
    )
    payload, info = ac.sign_auth_capture(p.payer, req, now=now)
    return info, payload.signature, ac.parse_extra(req.extra).deployment


def test_code_answers_at_both_canonical_deployments_and_hashes_like_us(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties
) -> None:
    for deployment in ac.DEPLOYMENTS:
        for address in (deployment.escrow, deployment.eip3009_collector,
                        deployment.operator_refund_collector):  # fmt: skip
            assert len(chain_client.rpc("eth_getCode", [address, "latest"])) > 100
        info, _, _ = signed_terms(chain, chain_client, parties, deployment=deployment)
        escrow = EscrowClient(chain_client, deployment)
        assert escrow.contract_hash(info) == escrow.payment_hash(info)
        # the payer-agnostic nonce is the contract's own getHash with payer zeroed
        assert "0x" + escrow.contract_hash(info.without_payer()).hex() == ac.payer_agnostic_nonce(
            info, chain_id=chain.chain_id, escrow=deployment.escrow
        )
    v10, v11 = ac.DEPLOYMENTS
    assert ac.payment_info_hash(info, chain_id=31337, escrow=v10.escrow) != ac.payment_info_hash(
        info, chain_id=31337, escrow=v11.escrow
    )


@pytest.mark.parametrize("deployment", ac.DEPLOYMENTS, ids=lambda d: d.version)
def test_authorize_capture_twice_refund_part_void_rest(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties, deployment: ac.Deployment
) -> None:
    p = parties
    info, sig, dep = signed_terms(
        chain, chain_client, p, deployment=deployment, fee_recipient=p.fees.address,
        min_fee_bps=100, max_fee_bps=500,
    )  # fmt: skip
    escrow = EscrowClient(chain_client, dep)
    who = (p.payer.address, p.receiver.address, p.fees.address, p.operator.address)
    payer0, recv0, fees0, op0 = balances(chain_client, chain, *who)

    receipt = escrow.execute(
        p.operator, ac.authorize_data(info, 1_000_000, dep.eip3009_collector, sig)
    )
    assert receipt.status == 1
    assert balances(chain_client, chain, *who) == [payer0 - 1_000_000, recv0, fees0, op0]
    store = escrow.token_store(p.operator.address)
    assert chain_client.token_balance(chain.token, store) == 1_000_000
    assert escrow.state(info) == ac.EscrowState(True, 1_000_000, 0)

    # capture 300_000 at 2.5 % then 200_000 at 1 %: fee = amount * bps // 10000
    assert escrow.execute(p.operator, ac.capture_data(info, 300_000, 250, p.fees.address)).status
    assert escrow.execute(p.operator, ac.capture_data(info, 200_000, 100, p.fees.address)).status
    fee = 300_000 * 250 // 10_000 + 200_000 * 100 // 10_000
    assert fee == 9_500
    assert balances(chain_client, chain, *who) == [
        payer0 - 1_000_000,
        recv0 + 500_000 - fee,
        fees0 + fee,
        op0,
    ]
    assert escrow.state(info) == ac.EscrowState(True, 500_000, 500_000)

    # refund 120_000 of the captured 500_000, funded by the operator through the refund collector
    approve(chain_client, chain.token, p.operator, dep.operator_refund_collector, 120_000)
    refund = ac.refund_data(info, 120_000, dep.operator_refund_collector)
    assert escrow.execute(p.operator, refund).status == 1
    assert escrow.state(info) == ac.EscrowState(True, 500_000, 380_000)

    assert escrow.execute(p.operator, ac.void_data(info)).status == 1
    assert escrow.state(info) == ac.EscrowState(True, 0, 380_000)
    assert balances(chain_client, chain, *who) == [
        payer0 - 1_000_000 + 120_000 + 500_000,
        recv0 + 500_000 - fee,
        fees0 + fee,
        op0 - 120_000,
    ]
    assert chain_client.token_balance(chain.token, store) == 0

    # the escrow's logs replay to the same state (what reconciliation relies on)
    history = escrow.history(info, from_block=0)
    assert [(e.name, e.amount) for e in history] == [
        ("PaymentAuthorized", 1_000_000),
        ("PaymentCaptured", 300_000),
        ("PaymentCaptured", 200_000),
        ("PaymentRefunded", 120_000),
        ("PaymentVoided", 500_000),
    ]
    assert [e.fee_bps for e in history[1:3]] == [250, 100]
    assert {e.fee_receiver for e in history[1:3]} == {p.fees.address}
    assert ac.state_from_events(history) == escrow.state(info)
    assert history[-1].connector_event == "payment.voided"

    # nothing left to void; the same signature cannot authorize twice
    assert escrow.simulate(p.operator.address, ac.void_data(info)).reason == "zero_authorization"
    again = ac.authorize_data(info, 1_000_000, dep.eip3009_collector, sig)
    assert escrow.simulate(p.operator.address, again).reason == "payment_already_collected"


def test_charge_pays_out_at_once_and_returns_the_unused_maximum(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties
) -> None:
    p = parties
    info, sig, dep = signed_terms(
        chain, chain_client, p, amount=1_000_000, fee_recipient=ac.ZERO_ADDRESS, max_fee_bps=1_000
    )
    escrow = EscrowClient(chain_client, dep)
    who = (p.payer.address, p.receiver.address, p.fees.address)
    before = balances(chain_client, chain, *who)
    # feeRecipient zero in the terms: the operator picks any non-zero fee receiver
    data = ac.charge_data(info, 333_333, dep.eip3009_collector, sig, 750, p.fees.address)
    assert escrow.execute(p.operator, data).status == 1
    fee = 333_333 * 750 // 10_000
    assert fee == 24_999
    assert balances(chain_client, chain, *who) == [
        before[0] - 333_333,
        before[1] + 333_333 - fee,
        before[2] + fee,
    ]
    assert escrow.state(info) == ac.EscrowState(True, 0, 333_333)
    (charged,) = escrow.history(info, from_block=0)
    assert (charged.name, charged.amount, charged.fee_bps) == ("PaymentCharged", 333_333, 750)
    assert chain_client.token_balance(chain.token, dep.eip3009_collector) == 0


def test_reclaim_by_the_payer_only_after_the_capture_deadline(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties
) -> None:
    p = parties
    info, sig, dep = signed_terms(chain, chain_client, p, capture_in=600, refund_in=1_200)
    escrow = EscrowClient(chain_client, dep)
    assert (
        escrow.execute(
            p.operator, ac.authorize_data(info, 400_000, dep.eip3009_collector, sig)
        ).status
        == 1
    )
    # maxAmount was 1_000_000: the collector returned the 600_000 not authorized
    held_payer = chain_client.token_balance(chain.token, p.payer.address)

    assert escrow.simulate(p.payer.address, ac.reclaim_data(info)).reason == (
        "before_authorization_expiry"
    )
    travel(chain_client, 601)
    assert escrow.simulate(p.operator.address, ac.reclaim_data(info)).reason == (
        "invalid_capture_authorizer"
    )  # only the payer may reclaim
    late_capture = ac.capture_data(info, 100_000, 0, ac.ZERO_ADDRESS)
    assert escrow.simulate(p.operator.address, late_capture).reason == "capture_deadline_expired"
    assert escrow.execute(p.payer, ac.reclaim_data(info)).status == 1
    assert chain_client.token_balance(chain.token, p.payer.address) == held_payer + 400_000
    assert escrow.state(info) == ac.EscrowState(True, 0, 0)
    # a reclaim done by the payer alone shows up in the payment's history
    history = escrow.history(info, from_block=0)
    assert [(e.connector_event, e.amount) for e in history] == [
        ("payment.authorized", 400_000),
        ("payment.reclaimed", 400_000),
    ]
    assert ac.state_from_events(history) == escrow.state(info)


def test_refund_after_the_refund_deadline_is_refused_and_moves_nothing(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties
) -> None:
    p = parties
    info, sig, dep = signed_terms(chain, chain_client, p, capture_in=600, refund_in=900)
    escrow = EscrowClient(chain_client, dep)
    assert (
        escrow.execute(
            p.operator,
            ac.charge_data(info, 1_000_000, dep.eip3009_collector, sig, 0, ac.ZERO_ADDRESS),
        ).status
        == 1
    )
    approve(chain_client, chain.token, p.operator, dep.operator_refund_collector, 10**12)
    over = ac.refund_data(info, 1_000_001, dep.operator_refund_collector)
    assert escrow.simulate(p.operator.address, over).reason == "refund_exceeds_capture"
    travel(chain_client, 901)
    who = (p.payer.address, p.receiver.address, p.operator.address)
    before = balances(chain_client, chain, *who)
    late = ac.refund_data(info, 1_000, dep.operator_refund_collector)
    assert escrow.simulate(p.operator.address, late).reason == "refund_deadline_expired"
    assert escrow.execute(p.operator, late).status == 0
    assert balances(chain_client, chain, *who) == before
    assert escrow.state(info) == ac.EscrowState(True, 0, 1_000_000)


def test_fee_rules_and_access_control_are_enforced_on_chain(
    chain: DevChainInfo, chain_client: ChainClient, parties: Parties
) -> None:
    p = parties
    info, sig, dep = signed_terms(
        chain, chain_client, p, fee_recipient=p.fees.address, min_fee_bps=100, max_fee_bps=300
    )
    escrow = EscrowClient(chain_client, dep)
    op = p.operator.address
    auth = ac.authorize_data(info, 1_000_000, dep.eip3009_collector, sig)
    assert escrow.simulate(p.outsider.address, auth).reason == "invalid_capture_authorizer"
    wrong_collector = ac.authorize_data(info, 1_000_000, dep.operator_refund_collector, sig)
    assert escrow.simulate(op, wrong_collector).reason == "invalid_collector"
    assert escrow.simulate(op, ac.authorize_data(
        info, 1_000_001, dep.eip3009_collector, sig)).reason == "amount_mismatch"  # fmt: skip
    assert escrow.execute(p.operator, auth).status == 1
    cases = {
        "fee_bps_out_of_range": ac.capture_data(info, 10, 99, p.fees.address),
        "invalid_fee_receiver": ac.capture_data(info, 10, 100, p.outsider.address),
        "insufficient_authorization": ac.capture_data(info, 1_000_001, 100, p.fees.address),
        "amount_mismatch": ac.capture_data(info, 0, 100, p.fees.address),
    }
    for reason, data in cases.items():
        assert escrow.simulate(op, data).reason == reason, reason
    no_receiver = ac.PaymentInfo(**{**info.__dict__, "fee_receiver": ac.ZERO_ADDRESS})
    assert escrow.simulate(op, ac.capture_data(no_receiver, 10, 100, ac.ZERO_ADDRESS)).reason == (
        "zero_fee_receiver"
    )
    assert escrow.state(info) == ac.EscrowState(True, 1_000_000, 0)
