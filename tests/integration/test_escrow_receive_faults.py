"""On-chain escrow (``authCapture``) on the receiving side under faults: unknown outcomes stay
unknown, a retry resumes and never moves money twice, a definite refusal moves nothing.

Real parts: the paywall app over HTTP, SQLite/PostgreSQL, anvil with the escrow at its canonical
addresses, our local facilitator (the escrow's operator). Faults are real too: anvil with automine
off (the facilitator answers ``settlement_pending`` with a transaction that lands later), and a
facilitator whose ``/settle`` hangs, refuses, or does the work and then fails to answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine

from api.facilitator_app import create_facilitator_app
from connector.chain import ChainClient
from connector.devchain.anvil import Anvil
from connector.devchain.deploy import DevChainInfo
from connector.errors import SettlementPending
from connector.facilitator.local import LocalFacilitator
from connector.payments import escrow, escrow_operator
from connector.payments.context_loader import load_connection
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.payments import Payment
from connector.x402 import auth_capture as ac
from connector.x402 import codec
from tests.fixtures.servers import LiveServer
from tests.integration.test_paywall import (
    counting_statements,
    offer,
    paid_count,
    pay_header,
    paywall_app,
    seller_connection,
    url_of,
)

pytestmark = [pytest.mark.chain]


@contextmanager
def operator_facilitator(
    chain: DevChainInfo, gas: LocalAccount, client: ChainClient
) -> Iterator[tuple[LiveServer, dict[str, str], LocalFacilitator]]:
    """A facilitator (gas key ``gas``: the escrow operator) behind a switch for ``/settle``:
    ``real``; ``hang`` (nothing done, answers after the client gave up); ``refuse`` (a definite
    refusal, nothing done); ``swallow`` (does the work, then answers 500 as if it crashed)."""
    local = LocalFacilitator(
        client, gas, network=chain.network, assets={chain.token}, receipt_timeout_s=0.5
    )
    mode = {"settle": "real"}
    release = threading.Event()
    app = FastAPI()

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        body = await request.json()
        if mode["settle"] == "hang":
            await _wait(release)
            return JSONResponse({"success": False, "errorReason": "late", "transaction": ""})
        if mode["settle"] == "refuse":
            return JSONResponse(
                {"success": False, "errorReason": "invalid_operation_state", "transaction": ""}
            )
        answer = local.settle(body)
        if mode["settle"] == "swallow":
            return JSONResponse({"error": "crashed"}, status_code=500)
        return JSONResponse(answer)

    app.mount("/", create_facilitator_app(local))
    with LiveServer(app) as server:
        try:
            yield server, mode, local
        finally:
            release.set()


async def _wait(flag: threading.Event) -> None:
    import asyncio

    for _ in range(100):
        if flag.is_set():
            return
        await asyncio.sleep(0.05)


def _payment(rt: Runtime, payment_id: str) -> Payment:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    assert payment is not None
    return payment


@contextmanager
def no_mining(node: Anvil) -> Iterator[None]:
    node._rpc("evm_setAutomine", [False])
    try:
        yield
    finally:
        node._rpc("evm_setAutomine", [True])
        node._rpc("evm_mine", [])


@pytest.fixture
def setup(
    engine: Engine,
    tmp_path: Path,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> Iterator[dict[str, Any]]:
    # accounts[18] operates the escrow here (the session facilitator's key 19 stays untouched)
    with (
        operator_facilitator(chain, accounts[18], chain_client) as (fac, mode, local),
        paywall_app(engine, tmp_path, facilitator_timeout_s=1.0, external_max_retries=1) as (
            rt,
            server,
        ),
    ):
        conn_id = seller_connection(rt, chain, accounts[13], fac.url)
        yield {"rt": rt, "server": server, "mode": mode, "conn": conn_id, "local": local}


def _held(setup: dict[str, Any], payer: LocalAccount, receiver: str, amount: int = 700) -> str:
    """A paywall paid into the escrow (authorized); its payment id."""
    rt, server = setup["rt"], setup["server"]
    rid = offer(rt, setup["conn"], capture="manual", pay_to=receiver, amount=str(amount))
    first = httpx.get(url_of(server, rid))
    paid = httpx.get(url_of(server, rid), headers=pay_header(payer, first), timeout=30)
    assert paid.status_code == 200, paid.text
    payment_id: str = paid.headers["x-x402c-payment-id"]
    assert _payment(rt, payment_id).state == "authorized"
    return payment_id


def test_the_escrow_offer_is_fixed_at_creation_and_served_from_memory(
    setup: dict[str, Any], accounts: list[LocalAccount]
) -> None:
    rt, server = setup["rt"], setup["server"]
    fees = Account.create().address
    created = int(time.time())
    rid = offer(
        rt, setup["conn"], capture="automatic", scheme="authCapture",
        min_fee_bps=10, max_fee_bps=20, fee_receiver=fees, capture_deadline_s=4_000,
    )  # fmt: skip
    first = httpx.get(url_of(server, rid))
    assert first.status_code == 402
    required = codec.decode_b64_json(first.headers["payment-required"], "h")
    assert first.json() == required  # v2 only: no v1 body
    spec, alias = required["accepts"]
    assert (spec["scheme"], alias["scheme"]) == ("authCapture", "auth-capture")
    assert {**alias, "scheme": "authCapture"} == spec  # the same terms under both names
    extra = ac.parse_extra(spec["extra"])
    assert extra.capture_authorizer == accounts[18].address  # the facilitator's signer
    assert (extra.min_fee_bps, extra.max_fee_bps, extra.fee_recipient) == (10, 20, fees)
    assert created + 4_000 <= extra.capture_deadline <= int(time.time()) + 4_000
    assert extra.refund_deadline == extra.capture_deadline + 7 * 24 * 3600
    assert spec["extra"]["autoCapture"] is True
    started = time.monotonic()
    with counting_statements(rt.engine) as statements:
        again = [httpx.get(url_of(server, rid)) for _ in range(10)]
    windows = (time.monotonic() - started) / rt.settings.paywall_state_ttl_s
    # The offer itself is never read again and nothing is written. Only the request's state
    # (paid out? voided?) is re-read, at most once per state-cache window: a loaded machine may
    # take longer than one window for these ten requests.
    assert all(
        s.lstrip().upper().startswith("SELECT") and "payment_requests" in s for s in statements
    ), statements
    assert len(statements) <= int(windows) + 1, (len(statements), windows)
    assert {r.headers["payment-required"] for r in again} == {first.headers["payment-required"]}


def test_a_pending_collection_keeps_the_claim_and_the_same_header_delivers_later(
    setup: dict[str, Any],
    devchain_node: tuple[Anvil, DevChainInfo],
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:
    rt, server = setup["rt"], setup["server"]
    node, _ = devchain_node
    payer = accounts[6]
    rid = offer(rt, setup["conn"], capture="manual", pay_to=Account.create().address)
    first = httpx.get(url_of(server, rid))
    assert first.status_code == 402 and "payment-required" in first.headers
    mine = pay_header(payer, first)
    before = chain_client.token_balance(chain.token, payer.address)
    with no_mining(node):
        pending = httpx.get(url_of(server, rid), headers=mine, timeout=30)
        assert pending.status_code == 503, pending.text
        assert pending.headers["retry-after"] == "5"
        pid = pending.json()["payment_id"]
        waiting = _payment(rt, pid)
        assert waiting.state == "settling" and waiting.tx_hash  # the submitted authorize
        assert paid_count(rt, rid) == 1  # the claim is kept while the outcome is unknown
        # the same header while still unmined: still unknown, nothing sent twice
        assert httpx.get(url_of(server, rid), headers=mine, timeout=30).status_code == 503
    done = httpx.get(url_of(server, rid), headers=mine, timeout=30)
    assert done.status_code == 200, done.text
    assert done.headers["x-x402c-payment-id"] == pid
    held = _payment(rt, pid)
    assert held.state == "authorized" and held.escrow is not None
    assert held.escrow["held"] == "700" and held.tx_hash == waiting.tx_hash
    assert chain_client.token_balance(chain.token, payer.address) == before - 700  # once
    assert paid_count(rt, rid) == 1


def test_a_refused_collection_fails_and_gives_the_slot_back(
    setup: dict[str, Any], accounts: list[LocalAccount]
) -> None:
    rt, server, mode = setup["rt"], setup["server"], setup["mode"]
    rid = offer(rt, setup["conn"], capture="manual")
    first = httpx.get(url_of(server, rid))
    mode["settle"] = "refuse"
    refused = httpx.get(url_of(server, rid), headers=pay_header(accounts[7], first), timeout=30)
    assert refused.status_code == 402
    assert paid_count(rt, rid) == 0
    mode["settle"] = "real"
    ok = httpx.get(url_of(server, rid), headers=pay_header(accounts[8], first), timeout=30)
    assert ok.status_code == 200, ok.text


def test_a_capture_without_receipt_is_pending_and_its_retry_never_captures_twice(
    setup: dict[str, Any],
    devchain_node: tuple[Anvil, DevChainInfo],
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:
    rt = setup["rt"]
    node, _ = devchain_node
    receiver = Account.create().address
    pid = _held(setup, accounts[6], receiver)
    ctx = load_connection(rt, setup["conn"])
    with no_mining(node):
        with pytest.raises(SettlementPending):
            escrow.release(rt, ctx, pid, amount=300, key="job-a")
        op = escrow_operator.operations(_payment(rt, pid))[0]
        assert (op["status"], op["type"], op["amount"]) == ("pending", "capture", "300")
        assert op["tx_hash"]
        with pytest.raises(SettlementPending):  # still unmined: the retry only reads
            escrow.release(rt, ctx, pid, amount=300, key="job-a")
        # another operation waits for this one (its outcome decides what is still held)
        with pytest.raises(escrow_operator.EscrowBusy):
            escrow.void(rt, ctx, pid, key="job-b")
    captured = escrow.release(rt, ctx, pid, amount=300, key="job-a")
    assert captured.state == "captured" and captured.captured_amount == 300
    again = escrow.release(rt, ctx, pid, amount=300, key="job-a")  # a redelivered job
    assert again.captured_amount == 300
    assert chain_client.token_balance(chain.token, receiver) == 300
    voided = escrow.void(rt, ctx, pid, key="job-b")  # now it runs: the rest goes back
    assert voided.escrow is not None and voided.escrow["voided"] == "400"


def test_an_operation_done_but_never_answered_is_found_in_the_history_not_sent_again(
    setup: dict[str, Any], chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    rt, mode = setup["rt"], setup["mode"]
    receiver = Account.create().address
    pid = _held(setup, accounts[6], receiver)
    ctx = load_connection(rt, setup["conn"])
    mode["settle"] = "swallow"  # the capture is mined, the answer lost
    with pytest.raises(SettlementPending):
        escrow.release(rt, ctx, pid, amount=250, key="job-c")
    assert chain_client.token_balance(chain.token, receiver) == 250
    assert _payment(rt, pid).state == "authorized"  # the connector does not know yet
    mode["settle"] = "real"
    resumed = escrow.release(rt, ctx, pid, amount=250, key="job-c")
    assert resumed.state == "captured" and resumed.captured_amount == 250
    assert chain_client.token_balance(chain.token, receiver) == 250  # not captured twice


def test_a_facilitator_that_hangs_leaves_the_capture_unknown_then_it_is_sent_once(
    setup: dict[str, Any], chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    rt, mode = setup["rt"], setup["mode"]
    receiver = Account.create().address
    pid = _held(setup, accounts[6], receiver)
    ctx = load_connection(rt, setup["conn"])
    mode["settle"] = "hang"
    with pytest.raises(SettlementPending):
        escrow.release(rt, ctx, pid, key="job-d")
    assert chain_client.token_balance(chain.token, receiver) == 0
    mode["settle"] = "real"
    resumed = escrow.release(rt, ctx, pid, key="job-d")  # no trace in the history: sent now
    assert resumed.captured_amount == 700
    assert chain_client.token_balance(chain.token, receiver) == 700


def test_a_refused_capture_fails_the_operation_and_moves_nothing(
    setup: dict[str, Any], chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    rt, mode = setup["rt"], setup["mode"]
    receiver = Account.create().address
    pid = _held(setup, accounts[6], receiver)
    ctx = load_connection(rt, setup["conn"])
    mode["settle"] = "refuse"
    with pytest.raises(escrow_operator.EscrowOperationFailed):
        escrow.release(rt, ctx, pid, amount=100, key="job-e")
    with pytest.raises(escrow_operator.EscrowOperationFailed):  # the same job: same answer
        escrow.release(rt, ctx, pid, amount=100, key="job-e")
    assert chain_client.token_balance(chain.token, receiver) == 0
    assert _payment(rt, pid).state == "authorized"
    mode["settle"] = "real"
    assert escrow.release(rt, ctx, pid, amount=100, key="job-f").captured_amount == 100


def test_a_refund_with_its_operator_unfunded_is_a_failed_refund_and_moves_nothing(
    setup: dict[str, Any], chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    from connector.payments import refunds

    rt = setup["rt"]
    payer = accounts[6]
    pid = _held(setup, payer, Account.create().address)
    ctx = load_connection(rt, setup["conn"])
    escrow.release(rt, ctx, pid, key="job-g")
    before = chain_client.token_balance(chain.token, payer.address)
    refund = refunds.start_refund(rt, ctx, pid, 100, "unhappy", "job-h")
    assert refund.state == "failed" and refund.failure_reason  # the escrow refuses the pull
    assert chain_client.token_balance(chain.token, payer.address) == before
    payment = _payment(rt, pid)
    assert payment.state == "captured" and payment.refunded_amount == 0


def test_manual_capture_falls_back_to_the_exact_hold_where_escrow_cannot_run(
    setup: dict[str, Any], devchain_node: tuple[Anvil, DevChainInfo], chain: DevChainInfo,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    from connector.actions.schemas import ReceiveInput
    from connector.payments import receive

    rt = setup["rt"]
    node, _ = devchain_node

    def scheme_of(conn_id: str, **fields: Any) -> str:
        ctx = load_connection(rt, conn_id)
        inp = ReceiveInput.model_validate({"amount": "5", "capture": "manual", **fields})
        return receive.create_request(rt, ctx, inp).scheme

    # a facilitator that does not operate the escrow (no authCapture in /supported)
    plain = FastAPI()

    @plain.get("/supported")
    def supported() -> dict[str, Any]:
        kinds = [{"x402Version": 2, "scheme": "exact", "network": chain.network}]
        return {"kinds": kinds, "signers": {"eip155:*": [accounts[18].address]}}

    with LiveServer(plain) as other:
        conn = seller_connection(rt, chain, accounts[12], other.url)
        assert scheme_of(conn) == "exact"
        with pytest.raises(escrow_operator.EscrowUnavailable):
            scheme_of(conn, scheme="authCapture")
    # no escrow code on the chain (inside this test's snapshot): the hold, whatever the facilitator
    escrow_operator._cache.clear()
    node._rpc("anvil_setCode", [ac.DEFAULT_DEPLOYMENT.escrow, "0x"])
    try:
        assert scheme_of(setup["conn"]) == "exact"
        with pytest.raises(escrow_operator.EscrowUnavailable):
            scheme_of(setup["conn"], max_fee_bps=5, fee_receiver=accounts[3].address)
    finally:
        escrow_operator._cache.clear()


def test_of_two_runs_of_one_job_only_one_sends(
    setup: dict[str, Any], chain: DevChainInfo, chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    rt = setup["rt"]
    receiver = Account.create().address
    pid = _held(setup, accounts[6], receiver)
    ctx = load_connection(rt, setup["conn"])
    escrow_operator._plan(rt, _payment(rt, pid), "capture", "job-x", 100, None, None)
    # a redelivered task and the original both decide to send: one claim wins
    assert escrow_operator._claim_send(rt, pid, "job-x", 0) is True
    assert escrow_operator._claim_send(rt, pid, "job-x", 0) is False
    # the winner never reported back: the next run looks at the history, finds nothing, sends once
    done = escrow.release(rt, ctx, pid, amount=100, key="job-x")
    assert done.captured_amount == 100
    assert chain_client.token_balance(chain.token, receiver) == 100
