"""The payer's side of an outgoing authCapture payment on anvil: the escrow view picks up a
capture done by the operator outside the connector, and the payer reclaims the rest alone after
the capture deadline (refused, with nothing sent, before it)."""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount

from connector.chain import ChainClient
from connector.chain.auth_capture import EscrowClient
from connector.devchain.deploy import DevChainInfo
from connector.errors import Conflict, ValidationFailed
from connector.payments import escrow_onchain
from connector.payments import protocol as proto
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac
from tests.fixtures.escrow import chain_now, requirement, travel, wall_now

pytestmark = pytest.mark.chain


def test_view_and_reclaim_from_the_stored_payload(
    chain: DevChainInfo, chain_client: ChainClient, accounts: list[LocalAccount]
) -> None:
    payer, operator, receiver = accounts[1], accounts[2], accounts[3]
    now = chain_now(chain_client)
    # The payer signs preApprovalExpiry = wall clock + 300 s, which must not pass the capture
    # deadline taken from the chain's clock; anvil's clock lags the wall clock by every reverted
    # test before this one (decision 0007), so the window covers that lag.
    capture_in = 600 + max(0, wall_now() - now)
    req = requirement(
        chain,
        operator=operator.address,
        pay_to=receiver.address,
        now=now,
        capture_in=capture_in,
        deployment=ac.DEPLOYMENT_V1_0,
    )
    signed = proto.sign_payment(payer, req, 2, None)
    payment = Payment(id="pay_test", signed_payload=signed.wire)
    info, deployment = escrow_onchain.terms_of(payment)
    assert deployment == ac.DEPLOYMENT_V1_0 and info.payer == payer.address
    assert signed.nonce == ac.payer_agnostic_nonce(info, chain_id=31337, escrow=deployment.escrow)

    # the operator authorizes and captures part, without the payer's connector knowing
    escrow = EscrowClient(chain_client, deployment)
    signature = bytes.fromhex(signed.wire["payload"]["signature"][2:])
    before = chain_client.token_balance(chain.token, payer.address)
    assert (
        escrow.execute(
            operator, ac.authorize_data(info, req.amount, deployment.eip3009_collector, signature)
        ).status
        == 1
    )
    assert escrow.execute(operator, ac.capture_data(info, 300_000, 0, ac.ZERO_ADDRESS)).status == 1

    view = escrow_onchain.escrow_view(chain_client, payment)
    assert view.state == ac.EscrowState(True, 700_000, 300_000)
    assert [e.connector_event for e in view.events] == ["payment.authorized", "payment.captured"]

    with pytest.raises(Conflict) as early:
        escrow_onchain.reclaim(chain_client, payer, payment)
    assert early.value.context["reason"] == "before_authorization_expiry"
    with pytest.raises(ValidationFailed):
        escrow_onchain.reclaim(chain_client, receiver, payment)
    assert chain_client.token_balance(chain.token, payer.address) == before - req.amount

    travel(chain_client, capture_in + 1)
    tx = escrow_onchain.reclaim(chain_client, payer, payment)
    assert tx.startswith("0x")
    assert chain_client.token_balance(chain.token, payer.address) == before - 300_000
    view = escrow_onchain.escrow_view(chain_client, payment)
    assert view.state == ac.EscrowState(True, 0, 300_000)
    assert view.events[-1].connector_event == "payment.reclaimed"
    assert view.events[-1].amount == 700_000
    with pytest.raises(Conflict) as again:
        escrow_onchain.reclaim(chain_client, payer, payment)
    assert again.value.context["reason"] == "zero_authorization"


def test_an_exact_payment_has_no_escrow_terms() -> None:
    with pytest.raises(ValidationFailed):
        escrow_onchain.terms_of(Payment(id="pay_x", signed_payload={"payload": {}}))
