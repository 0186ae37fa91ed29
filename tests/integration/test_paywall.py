"""The paywall's edge: unpaid hits from memory, invalidation, claims under concurrency, and
unknown settlement outcomes (issue 13).

Real parts: the app over HTTP on loopback (uvicorn), SQLite and PostgreSQL, anvil with DevUSD,
our local facilitator. Faults are real too: a facilitator whose ``/settle`` hangs past the
client's timeout, and anvil with automine off (the facilitator then answers
``settlement_pending`` with a transaction hash that lands later).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import event, func, select, update
from sqlalchemy.engine import Engine
from sqlmodel import col

import connector.payments.protocol as proto
from api.app import create_app
from api.facilitator_app import create_facilitator_app
from connector.actions.schemas import ReceiveInput
from connector.chain import ChainClient
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.anvil import Anvil
from connector.devchain.deploy import DevChainInfo
from connector.facilitator.local import LocalFacilitator
from connector.payments import offers, receive
from connector.payments.context_loader import load_connection
from connector.payments.maintenance import reconcile
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import UnitOfWork, transaction
from connector.storage.models.payments import Payment, PaymentRequest
from connector.vault import MasterKeyRing
from connector.x402 import codec
from connector.x402.requirement import requirement_from_wire
from tests.fixtures.servers import LiveServer, free_port

pytestmark = [pytest.mark.chain]


@contextmanager
def paywall_app(
    engine: Engine, tmp_path: Path, **settings: Any
) -> Iterator[tuple[Runtime, LiveServer]]:
    port = free_port()
    rt = Runtime(
        settings=Settings(
            data_dir=tmp_path,
            master_keys=MasterKeyRing.generate_spec("t1"),
            public_base_url=f"http://127.0.0.1:{port}",
            outbound_allow_loopback=True,  # the facilitator and the chain are on loopback
            **settings,
        ),
        engine=engine,
    )
    with LiveServer(create_app(runtime=rt), port=port) as server:
        yield rt, server
    rt.close()


def seller_connection(rt: Runtime, chain: DevChainInfo, seller: LocalAccount, fac: str) -> str:
    with transaction(rt.engine) as s:
        return connections.create(
            s,
            rt.vault,
            ConnectionCreate.model_validate(
                {
                    "name": "seller", "network": chain.network, "rpc_url": chain.rpc_url,
                    "facilitator_url": fac, "asset": chain.token,
                    "private_key": "0x" + seller.key.hex(),
                }
            ),
        ).id  # fmt: skip


def offer(rt: Runtime, conn_id: str, now: datetime | None = None, **fields: Any) -> str:
    ctx = load_connection(rt, conn_id)
    inp = ReceiveInput.model_validate({"amount": "700", "resource": {"secret": 1}, **fields})
    return receive.create_request(rt, ctx, inp, now=now).id


def pay_header(account: LocalAccount, first: httpx.Response) -> dict[str, str]:
    """Sign what the 402 asks for, as any v2 client would."""
    required = codec.decode_b64_json(first.headers["payment-required"], "payment-required")
    accepted = required["accepts"][0]
    requirement = requirement_from_wire(accepted, 2)
    signed = proto.sign_payment(
        account, requirement, 2, required["resource"], accepted_raw=accepted
    )
    name, value = proto.payment_header(2, signed.wire)
    return {name: value}


def url_of(server: LiveServer, request_id: str) -> str:
    return f"{server.url}/pay/{request_id}"


@contextmanager
def counting_statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def paid_count(rt: Runtime, request_id: str) -> int:
    with UnitOfWork(rt.engine) as uow:
        row = uow.session.get(PaymentRequest, request_id)
        assert row is not None
        return row.paid_count


# ------------------------------------------------------------------------------ unpaid hits


def test_unpaid_hits_come_from_memory_and_pay_out_closes_at_once(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    # A long TTL: only this process's own invalidation can explain the 410 after the pay-out.
    with paywall_app(engine, tmp_path, paywall_state_ttl_s=60) as (rt, server):
        conn_id = seller_connection(rt, chain, accounts[2], facilitator_url)
        rid = offer(rt, conn_id)
        first = httpx.get(url_of(server, rid))
        assert first.status_code == 402
        required = codec.decode_b64_json(first.headers["payment-required"], "h")
        assert required["accepts"][0]["amount"] == "700"
        assert first.json()["accepts"][0]["maxAmountRequired"] == "700"  # v1 body too
        with counting_statements(rt.engine) as statements:
            again = [httpx.get(url_of(server, rid)) for _ in range(20)]
        assert statements == []  # no read, no write, no connection lookup
        assert all(r.status_code == 402 for r in again)
        assert {r.headers["payment-required"] for r in again} == {first.headers["payment-required"]}
        assert {r.content for r in again} == {first.content}
        for name in ("content-type", "access-control-expose-headers"):  # same as the slow path
            assert {r.headers[name] for r in again} == {first.headers[name]}
        assert all(r.headers["x-request-id"].startswith("req_") for r in [first, *again])
        echoed = httpx.get(url_of(server, rid), headers={"x-request-id": "trace-1"})
        assert echoed.headers["x-request-id"] == "trace-1"

        paid = httpx.get(url_of(server, rid), headers=pay_header(accounts[3], first), timeout=30)
        assert paid.status_code == 200, paid.text
        assert paid.json() == {"secret": 1}
        gone = httpx.get(url_of(server, rid))
        assert gone.status_code == 410 and "already paid" in gone.json()["error"]


def test_a_pay_out_by_another_process_shows_within_the_ttl(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with paywall_app(engine, tmp_path, paywall_state_ttl_s=0) as (rt, server):
        conn_id = seller_connection(rt, chain, accounts[2], facilitator_url)
        rid = offer(rt, conn_id, max_payments=2)
        assert httpx.get(url_of(server, rid)).status_code == 402
        this = col(PaymentRequest.id) == rid
        with transaction(rt.engine) as s:  # what another API replica's claims would write
            s.execute(update(PaymentRequest).where(this).values(paid_count=2))
        assert httpx.get(url_of(server, rid)).status_code == 410
        with transaction(rt.engine) as s:  # ... and a give-back there
            s.execute(update(PaymentRequest).where(this).values(paid_count=1))
        assert httpx.get(url_of(server, rid)).status_code == 402


def test_an_offer_expires_on_time_although_it_is_cached(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with paywall_app(engine, tmp_path, paywall_state_ttl_s=60) as (rt, server):
        conn_id = seller_connection(rt, chain, accounts[2], facilitator_url)
        created = datetime.now(UTC) - timedelta(seconds=9)  # expires_in_s=10: one second left
        rid = offer(rt, conn_id, now=created, expires_in_s=10)
        first = httpx.get(url_of(server, rid))
        if first.status_code == 402:  # still open when first seen (a slow machine may be late)
            header = pay_header(accounts[3], first)
            while datetime.now(UTC) <= created + timedelta(seconds=10):
                time.sleep(0.05)
        else:
            header = None
        gone = httpx.get(url_of(server, rid))
        assert gone.status_code == 410 and "expired" in gone.json()["error"]
        if header is not None:  # a payment for an expired offer is refused, nothing claimed
            refused = httpx.get(url_of(server, rid), headers=header)
            assert refused.status_code == 402
            assert paid_count(rt, rid) == 0


def test_unknown_request_is_404_and_is_not_cached(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
) -> None:  # fmt: skip
    with paywall_app(engine, tmp_path) as (rt, server):
        assert httpx.get(url_of(server, "prq_nope")).status_code == 404
        assert httpx.get(url_of(server, "prq_nope")).status_code == 404
        assert offers.cache_for(rt).cached("prq_nope") is None


# ------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("allowed", [1, 3])
def test_concurrent_payers_never_oversell(
    allowed: int, engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount], chain_client: ChainClient,
) -> None:  # fmt: skip
    payers = accounts[1:9]  # eight funded payers at once
    seller = accounts[13]
    with paywall_app(engine, tmp_path) as (rt, server):
        conn_id = seller_connection(rt, chain, seller, facilitator_url)
        rid = offer(rt, conn_id, max_payments=allowed)
        first = httpx.get(url_of(server, rid))
        headers = [pay_header(p, first) for p in payers]
        before = chain_client.token_balance(chain.token, seller.address)
        start = threading.Barrier(len(payers))

        def pay(h: dict[str, str]) -> httpx.Response:
            start.wait(timeout=30)
            return httpx.get(url_of(server, rid), headers=h, timeout=60)

        with ThreadPoolExecutor(len(payers)) as pool:
            answers = list(pool.map(pay, headers))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * allowed + [402] * (len(payers) - allowed), [
            (r.status_code, r.text[:200]) for r in answers
        ]
        refused = [r for r in answers if r.status_code == 402]
        assert all("already paid" in json.loads(base64.b64decode(
            r.headers["payment-required"]))["error"] for r in refused)  # fmt: skip
        with UnitOfWork(rt.engine) as uow:
            settled = uow.session.execute(
                select(func.count()).where(
                    col(Payment.payment_request_id) == rid, col(Payment.state) == "settled"
                )
            ).scalar_one()
            others = uow.session.execute(
                select(func.count()).where(
                    col(Payment.payment_request_id) == rid, col(Payment.state) != "settled"
                )
            ).scalar_one()
        assert settled == allowed and others == 0  # losers left no payment behind
        assert paid_count(rt, rid) == allowed
        after = chain_client.token_balance(chain.token, seller.address)
        assert after - before == allowed * 700  # on-chain == database


# ------------------------------------------------------------------------------ unknown outcomes


@contextmanager
def faulty_facilitator(local: LocalFacilitator) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """Our facilitator behind a switch: ``settle`` may hang (past the client's timeout) or answer
    a definite refusal; ``verify`` is always the real one."""
    mode = {"settle": "real"}
    real = create_facilitator_app(local)
    app = FastAPI()
    release = threading.Event()

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        if mode["settle"] == "hang":
            await _wait(release)
            return JSONResponse({"success": False, "errorReason": "late", "transaction": ""})
        if mode["settle"] == "refuse":
            return JSONResponse(
                {"success": False, "errorReason": "invalid_exact_evm_insufficient_balance",
                 "transaction": "", "network": local.network}
            )  # fmt: skip
        return JSONResponse(local.settle(await request.json()))

    app.mount("/", real)
    with LiveServer(app) as server:
        try:
            yield server, mode
        finally:
            release.set()


async def _wait(flag: threading.Event) -> None:
    import asyncio

    for _ in range(200):
        if flag.is_set():
            return
        await asyncio.sleep(0.05)


def test_a_hanging_facilitator_keeps_the_claim_and_a_retry_delivers(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount], chain_client: ChainClient,
) -> None:  # fmt: skip
    seller = accounts[14]
    with faulty_facilitator(local_facilitator) as (fac, mode), paywall_app(
        engine, tmp_path, facilitator_timeout_s=0.5, external_max_retries=1
    ) as (rt, server):
        conn_id = seller_connection(rt, chain, seller, fac.url)
        rid = offer(rt, conn_id)
        first = httpx.get(url_of(server, rid))
        mine = pay_header(accounts[4], first)
        mode["settle"] = "hang"
        pending = httpx.get(url_of(server, rid), headers=mine, timeout=30)
        assert pending.status_code == 503, pending.text
        assert pending.json()["status"] == "settlement_pending"
        assert paid_count(rt, rid) == 1  # the claim is kept: the outcome is unknown
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, pending.json()["payment_id"])
            assert payment is not None and payment.state == "settling"
        # Nobody else can take the slot meanwhile.
        other = httpx.get(url_of(server, rid), headers=pay_header(accounts[5], first), timeout=30)
        assert other.status_code == 402
        assert httpx.get(url_of(server, rid)).status_code == 410
        # The facilitator recovers; the payer retries the same payment: settled once, delivered.
        mode["settle"] = "real"
        before = chain_client.token_balance(chain.token, seller.address)
        done = httpx.get(url_of(server, rid), headers=mine, timeout=30)
        assert done.status_code == 200, done.text
        assert done.headers["x-x402c-payment-id"] == pending.json()["payment_id"]
        again = httpx.get(url_of(server, rid), headers=mine, timeout=30)
        assert again.status_code == 200  # idempotent: the same payment, not a second one
        assert chain_client.token_balance(chain.token, seller.address) == before + 700
        assert paid_count(rt, rid) == 1


def test_settlement_pending_keeps_the_claim_until_the_chain_answers(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    devchain_node: tuple[Anvil, DevChainInfo], accounts: list[LocalAccount],
    chain_client: ChainClient,
) -> None:  # fmt: skip
    node, _ = devchain_node
    seller = accounts[15]
    impatient = LocalFacilitator(
        local_facilitator.chain, accounts[18], network=chain.network, assets={chain.token},
        receipt_timeout_s=0.3,
    )  # fmt: skip
    with LiveServer(create_facilitator_app(impatient)) as fac, paywall_app(engine, tmp_path) as (
        rt,
        server,
    ):
        conn_id = seller_connection(rt, chain, seller, fac.url)
        rid = offer(rt, conn_id)
        first = httpx.get(url_of(server, rid))
        mine = pay_header(accounts[6], first)
        before = chain_client.token_balance(chain.token, seller.address)
        node._rpc("evm_setAutomine", [False])
        try:
            pending = httpx.get(url_of(server, rid), headers=mine, timeout=30)
        finally:
            node._rpc("evm_setAutomine", [True])
            node._rpc("evm_mine", [])
        assert pending.status_code == 503, pending.text
        assert paid_count(rt, rid) == 1
        pid = pending.json()["payment_id"]
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, pid)
            assert payment is not None and payment.state == "settling"
        # The transaction landed: the reconciler finds the nonce used and settles it.
        assert reconcile(rt, now=datetime.now(UTC) + timedelta(minutes=10)) >= 1
        with UnitOfWork(rt.engine) as uow:
            payment = uow.session.get(Payment, pid)
            assert payment is not None and payment.state == "settled"
        assert chain_client.token_balance(chain.token, seller.address) == before + 700
        assert paid_count(rt, rid) == 1


def test_a_definite_refusal_gives_the_slot_back(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, local_facilitator: LocalFacilitator,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with faulty_facilitator(local_facilitator) as (fac, mode), paywall_app(
        engine, tmp_path, paywall_state_ttl_s=60
    ) as (rt, server):
        conn_id = seller_connection(rt, chain, accounts[16], fac.url)
        rid = offer(rt, conn_id)
        first = httpx.get(url_of(server, rid))
        mode["settle"] = "refuse"
        refused = httpx.get(url_of(server, rid), headers=pay_header(accounts[7], first), timeout=30)
        assert refused.status_code == 402
        assert "insufficient_balance" in json.loads(
            base64.b64decode(refused.headers["payment-required"])
        )["error"]
        assert paid_count(rt, rid) == 0
        assert httpx.get(url_of(server, rid)).status_code == 402  # open again, at once
        mode["settle"] = "real"
        ok = httpx.get(url_of(server, rid), headers=pay_header(accounts[8], first), timeout=30)
        assert ok.status_code == 200, ok.text
        assert paid_count(rt, rid) == 1


def test_a_voided_hold_reopens_a_single_use_paywall(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount], chain_client: ChainClient,
) -> None:  # fmt: skip
    from connector.payments import escrow

    with paywall_app(engine, tmp_path, paywall_state_ttl_s=60) as (rt, server):
        conn_id = seller_connection(rt, chain, accounts[17], facilitator_url)
        rid = offer(rt, conn_id, capture="manual", scheme="exact")
        first = httpx.get(url_of(server, rid))
        held = httpx.get(url_of(server, rid), headers=pay_header(accounts[2], first), timeout=30)
        assert held.status_code == 200, held.text  # delivered against the hold
        assert paid_count(rt, rid) == 1
        assert httpx.get(url_of(server, rid)).status_code == 410
        voided = escrow.void(rt, load_connection(rt, conn_id), held.headers["x-x402c-payment-id"])
        assert voided.state == "voided"
        assert paid_count(rt, rid) == 0  # nothing moved: the slot is free again
        assert httpx.get(url_of(server, rid)).status_code == 402
        assert chain_client.token_balance(chain.token, accounts[17].address) == 0


def test_the_memory_path_leaves_hostile_requests_to_the_edge_guard(
    engine: Engine, tmp_path: Path, chain: DevChainInfo, facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:  # fmt: skip
    with paywall_app(engine, tmp_path, paywall_state_ttl_s=60) as (rt, server):
        rid = offer(rt, seller_connection(rt, chain, accounts[2], facilitator_url))
        assert httpx.get(url_of(server, rid)).status_code == 402  # cached from here on
        assert httpx.get(url_of(server, rid) + "?x=%00").status_code == 422
        big = b"x" * (rt.settings.api_max_body_bytes + 1)
        assert httpx.post(url_of(server, rid), content=big).status_code == 413
        assert httpx.get(url_of(server, rid)).status_code == 402
