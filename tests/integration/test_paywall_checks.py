"""The paywall's own check of an automatically captured payment (decision 0012), and the paid
path's fast lane through the ASGI app.

With automatic capture the paywall verifies a payment itself (signature, amounts, deadlines,
payee, asset, and the chain: nonce unused, balance) and goes to the claim without a ``/verify``
round trip; ``/settle`` verifies again. What must hold, and is asserted here against the real
facilitator, anvil and both databases:

* an authorization whose money already moved elsewhere is refused before any claim, never
  counted as this paywall's payment (a used nonce would otherwise read as "settled");
* a bad signature, an unfunded payer, a wrong amount cost no claim, no row, no facilitator call;
* manual capture still asks ``/verify`` (a hold is settled later);
* a chain that cannot be read falls back to the facilitator's ``/verify``.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from api.facilitator_app import create_facilitator_app
from connector.chain import ChainClient
from connector.chain.reads import PaymentStateReader
from connector.devchain.deploy import DevChainInfo, dev_accounts
from connector.facilitator.local import LocalFacilitator
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment
from connector.x402 import codec
from tests.fixtures.servers import LiveServer, free_port
from tests.integration.test_paywall import (
    offer,
    paid_count,
    pay_header,
    paywall_app,
    seller_connection,
    url_of,
)

pytestmark = [pytest.mark.chain]


@contextmanager
def counted(local: LocalFacilitator) -> Iterator[tuple[str, Counter[str]]]:
    """Our facilitator over HTTP, counting the requests per path."""
    calls: Counter[str] = Counter()
    real = create_facilitator_app(local)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls[scope["path"]] += 1
        await real(scope, receive, send)

    with LiveServer(app) as server:
        yield server.url, calls


def refusal(answer: httpx.Response) -> str:
    assert answer.status_code == 402, (answer.status_code, answer.text[:300])
    return str(json.loads(base64.b64decode(answer.headers["payment-required"]))["error"])


def payments_of(engine: Engine, request_id: str) -> int:
    with UnitOfWork(engine) as uow:
        return int(
            uow.session.execute(
                select(func.count()).where(col(Payment.payment_request_id) == request_id)
            ).scalar_one()
        )


def tampered(header: dict[str, str], edit: Any) -> dict[str, str]:
    ((name, value),) = header.items()
    wire = codec.decode_b64_json(value, name)
    edit(wire["payload"])
    return {name: base64.b64encode(json.dumps(wire).encode()).decode()}


def test_automatic_capture_settles_without_a_verify_round_trip(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount], chain_client: ChainClient,
) -> None:  # fmt: skip
    seller = accounts[12]
    with counted(local_facilitator) as (fac, calls), paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(rt, seller_connection(rt, chain, seller, fac), max_payments=2)
        first = httpx.get(url_of(srv, rid))
        before = chain_client.token_balance(chain.token, seller.address)
        paid = httpx.get(url_of(srv, rid), headers=pay_header(accounts[3], first), timeout=30)
        assert paid.status_code == 200, paid.text
        assert paid.headers["x-request-id"]  # the fast lane answers like the routed path
        assert calls["/verify"] == 0 and calls["/settle"] == 1
        assert chain_client.token_balance(chain.token, seller.address) == before + 700
        assert paid_count(rt, rid) == 1
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, paid.headers["x-x402c-payment-id"])
            assert payment is not None and payment.state == "settled" and payment.tx_hash


def test_money_that_moved_elsewhere_is_refused_before_any_claim(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount], chain_client: ChainClient,
) -> None:  # fmt: skip
    """The payer's authorization was already settled by someone else (another seller sharing
    this payee address, say): its nonce is used on-chain. Without the paywall's chain read the
    claim would be taken and /settle's refusal decided from the chain, where a used nonce reads
    as this payment's settlement: the resource would be delivered for money paid for something
    else. It must be refused, leaving nothing behind."""
    seller = accounts[13]
    with counted(local_facilitator) as (fac, calls), paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(rt, seller_connection(rt, chain, seller, fac))
        first = httpx.get(url_of(srv, rid))
        header = pay_header(accounts[4], first)
        ((name, value),) = header.items()
        wire = codec.decode_b64_json(value, name)
        elsewhere = local_facilitator.settle(
            {"x402Version": 2, "paymentPayload": wire, "paymentRequirements": wire["accepted"]}
        )
        assert elsewhere["success"], elsewhere
        moved = chain_client.token_balance(chain.token, seller.address)
        answer = httpx.get(url_of(srv, rid), headers=header, timeout=30)
        assert "nonce" in refusal(answer)
        assert calls["/settle"] == 0 and calls["/verify"] == 0
        assert paid_count(rt, rid) == 0 and payments_of(rt.engine, rid) == 0
        assert httpx.get(url_of(srv, rid)).status_code == 402  # still open
        assert chain_client.token_balance(chain.token, seller.address) == moved


@pytest.mark.parametrize(
    "case",
    ["bad signature", "unfunded payer", "expired", "wrong amount"],
)
def test_hostile_payments_cost_no_claim_no_row_no_facilitator_call(
    case: str, engine: Engine, tmp_path: Path, chain: DevChainInfo,
    local_facilitator: LocalFacilitator, accounts: list[LocalAccount],
) -> None:  # fmt: skip
    seller = accounts[14]
    with counted(local_facilitator) as (fac, calls), paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(rt, seller_connection(rt, chain, seller, fac))
        first = httpx.get(url_of(srv, rid))
        payer = dev_accounts(20)[11] if case == "unfunded payer" else accounts[5]
        header = pay_header(payer, first)
        if case == "bad signature":
            header = tampered(header, lambda p: p.update(signature="0x" + "11" * 65))
        elif case == "expired":
            header = tampered(header, lambda p: p["authorization"].update(validBefore="1000"))
        elif case == "wrong amount":
            header = tampered(header, lambda p: p["authorization"].update(value="699"))
        reason = refusal(httpx.get(url_of(srv, rid), headers=header, timeout=30))
        expected = {
            "bad signature": "signature",
            "unfunded payer": "insufficient",
            "expired": "valid",
            "wrong amount": "amount",
        }[case]
        assert expected in reason.lower(), reason
        assert sum(calls.values()) == 0
        assert paid_count(rt, rid) == 0 and payments_of(rt.engine, rid) == 0


def test_manual_capture_still_asks_the_facilitator_to_verify(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with counted(local_facilitator) as (fac, calls), paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(
            rt, seller_connection(rt, chain, accounts[15], fac), capture="manual", scheme="exact"
        )
        first = httpx.get(url_of(srv, rid))
        held = httpx.get(url_of(srv, rid), headers=pay_header(accounts[6], first), timeout=30)
        assert held.status_code == 200, held.text
        assert calls["/verify"] == 1 and calls["/settle"] == 0


def test_an_unreadable_chain_falls_back_to_the_facilitators_verify(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    with counted(local_facilitator) as (fac, calls), paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(rt, seller_connection(rt, chain, accounts[16], fac))
        first = httpx.get(url_of(srv, rid))
        # The connection's node stops answering (the facilitator still reaches its own).
        dead = PaymentStateReader(f"http://127.0.0.1:{free_port()}", timeout_s=2, guard=None)
        monkeypatch.setattr(rt, "payment_state_reader", lambda _url: dead)
        paid = httpx.get(url_of(srv, rid), headers=pay_header(accounts[7], first), timeout=30)
        assert paid.status_code == 200, paid.text
        assert calls["/verify"] == 1 and calls["/settle"] == 1
        assert paid_count(rt, rid) == 1


def test_the_paid_lane_answers_errors_like_the_app(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with paywall_app(engine, tmp_path) as (rt, srv):
        rid = offer(rt, seller_connection(rt, chain, accounts[17], facilitator_url))
        header = pay_header(accounts[8], httpx.get(url_of(srv, rid)))
        unknown = httpx.get(
            url_of(srv, "prq_doesnotexist"), headers={**header, "x-request-id": "mine-1"}
        )
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/problem+json"
        assert unknown.headers["x-request-id"] == "mine-1"
        assert unknown.json()["type"].endswith("/not_found")
        assert unknown.json()["request_id"] == "mine-1"
        # Not a payment request's id: the routed path and its edge guard answer.
        odd = httpx.get(f"{srv.url}/pay/prq_x%00y", headers=header)
        assert odd.status_code == 422
        garbled = httpx.get(url_of(srv, rid), headers={"payment-signature": "not base64 json"})
        assert garbled.status_code == 422  # a malformed payment header: the app's problem
        assert garbled.headers["content-type"] == "application/problem+json"
