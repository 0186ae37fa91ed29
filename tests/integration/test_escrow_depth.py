"""Reading the escrow as a real network allows it, and trusting it only as deep as the network
needs (``authCapture``), on the real stack: anvil with the escrow at its canonical addresses, our
facilitator as the operator over loopback HTTP, PostgreSQL (the rig) or both databases (the
paywall).

* Public providers refuse ``eth_getLogs`` over more than a few thousand blocks. The connector
  never asks from genesis: a payment records a lower bound when it is created, history is read
  in ranges of at most ``rpc_max_log_range`` blocks, and how far it was read is remembered. The
  node here is :class:`tests.fixtures.rpc_proxy.RpcProxy`, which refuses wider ranges and
  records every query.
* An escrow event counts once the network's confirmations are reached (``head >= block +
  confirmations - 1``); until then the payment stays where it was and an action waiting for its
  own operation answers pending — never failed, never sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import text
from sqlalchemy.engine import Engine

from connector.chain import ChainClient
from connector.chain.auth_capture import MAX_RANGES_PER_READ
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.deploy import DevChainInfo
from connector.errors import SettlementPending
from connector.payments import escrow, escrow_operator, maintenance
from connector.payments.context_loader import load_connection
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork, transaction
from connector.storage.models.payments import Payment
from tests.fixtures.faults import FaultRig, count_events, money_invariants
from tests.fixtures.rpc_proxy import RpcProxy
from tests.integration.test_escrow_receive_faults import operator_facilitator
from tests.integration.test_escrow_reconcile import pay, shop
from tests.integration.test_paywall import offer, pay_header, paywall_app, url_of

MAX_RANGE = 16  # blocks per eth_getLogs the proxy allows (real providers: 1,000-10,000)


def later(minutes: int = 5) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


def mine(client: ChainClient, blocks: int) -> None:
    client.rpc("anvil_mine", [hex(blocks)])


def configure(rig: FaultRig, **changes: Any) -> None:
    """The rig's settings with ``changes`` (before its runtime built any chain client)."""
    rig.rt.settings = rig.rt.settings.model_copy(update=changes)


def payment_row(rt: Runtime, payment_id: str) -> Payment:
    with UnitOfWork(rt.engine) as uow:
        payment = uow.session.get(Payment, payment_id)
    assert payment is not None
    return payment


def events_of(engine: Engine, event_type: str, payment_id: str) -> int:
    with transaction(engine) as s:
        return int(
            s.execute(
                text("SELECT count(*) FROM events WHERE type = :t AND payment_id = :p"),
                {"t": event_type, "p": payment_id},
            ).scalar_one()
        )


def assert_bounded(proxy: RpcProxy) -> list[int]:
    """Every log query fits the provider's range and none starts at genesis; their starts."""
    queries = proxy.log_queries()
    assert queries, "no eth_getLogs at all"
    assert [q for q in queries if q.refused] == []
    assert max(q.span for q in queries) <= MAX_RANGE
    assert min(q.from_block or 0 for q in queries) > 0
    return [q.from_block or 0 for q in queries]


# ------------------------------------------------------------------ bounded log ranges


@pytest.mark.chain
@pytest.mark.postgres
def test_reconcile_finds_a_collection_far_from_genesis_in_bounded_log_ranges(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """A collection the connector never saw (mined while nobody watched), then many blocks: the
    reconciler finds it walking forward from the payment's recorded lower bound in ranges the
    node accepts, and the next pass starts where that one stopped."""
    configure(rig, rpc_max_log_range=MAX_RANGE)
    mine(rig.client, 150)  # far from genesis: a query from block 0 is refused
    with RpcProxy(rig.chain.rpc_url, max_range=MAX_RANGE) as proxy:
        conn = rig.connection(accounts[5], {"budget_day": "100000"}, rpc_url=proxy.url)
        with shop(rig, accounts[12].address, amount=30_000) as seller:
            rig.pause_mining()
            job, _ = pay(rig, conn, seller.url)
        paying = rig.payment_of(job)
        assert paying.state == "settling" and paying.tx_hash
        created_at = rig.client.block_number()
        bound = int((paying.escrow or {})["from_block"])
        assert 0 < bound <= created_at  # recorded when the payment was created
        mine(rig.client, 1)  # the collection lands ...
        landed = rig.client.get_receipt(paying.tx_hash)
        assert landed is not None and landed.status == 1
        mine(rig.client, 200)  # ... and the chain moves on
        rig.resume_mining()

        proxy.clear()
        maintenance.reconcile(rig.rt, now=later(2))
        held = rig.payment(paying.id)
        assert held.state == "authorized", (held.state, proxy.log_queries()[-1:])
        starts = assert_bounded(proxy)
        assert min(starts) >= bound  # never below the payment's bound
        assert count_events(rig, "payment.authorized", paying.id) == 1

        proxy.clear()
        mine(rig.client, 5)
        maintenance.reconcile(rig.rt, now=later(3))
        # the next pass reads only what it has not read: one range after the collection
        starts = assert_bounded(proxy)
        assert min(starts) > landed.block_number
        assert len(proxy.log_queries()) == 1
        assert count_events(rig, "payment.authorized", paying.id) == 1
    assert rig.run(job) == "succeeded"
    assert money_invariants(rig, {conn: 100_000}) == []


@pytest.mark.chain
@pytest.mark.postgres
def test_a_long_history_is_read_over_several_passes_and_nothing_is_decided_meanwhile(
    rig: FaultRig, accounts: list[LocalAccount], caplog: pytest.LogCaptureFixture
) -> None:
    """A collection further from the payment's bound than one read walks: the first pass reads
    its share, remembers where it stopped and decides nothing (no retry driven, no warning of a
    used nonce without events); the next pass goes on from there and finds it."""
    configure(rig, rpc_max_log_range=MAX_RANGE)
    per_read = MAX_RANGE * MAX_RANGES_PER_READ
    with RpcProxy(rig.chain.rpc_url, max_range=MAX_RANGE) as proxy:
        conn = rig.connection(accounts[6], {"budget_day": "100000"}, rpc_url=proxy.url)
        with shop(rig, accounts[12].address, amount=10_000) as seller:
            seller.down[0] = True  # takes the payment header, forwards nothing: unknown
            job, status = pay(rig, conn, seller.url)
            assert status == "queued"
            payment = rig.payment_of(job)
            bound = int((payment.escrow or {})["from_block"])
            mine(rig.client, per_read)
            seller.down[0] = False
            rig.pause_mining()
            rig.run(job)  # the same authorization again: collected, not mined yet
        mine(rig.client, 1)
        rig.resume_mining()
        collected_in = rig.client.get_receipt(str(rig.payment(payment.id).tx_hash))
        assert collected_in is not None and collected_in.block_number >= bound + per_read

        proxy.clear()
        rig.dispatched.clear()
        caplog.set_level(logging.INFO, logger="connector")
        caplog.clear()
        maintenance.reconcile(rig.rt, now=later(2))
        assert rig.payment(payment.id).state == "settling"
        assert rig.dispatched == []  # nothing decided from a partial read
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        starts = assert_bounded(proxy)
        assert (min(starts), len(starts)) == (bound, MAX_RANGES_PER_READ)

        proxy.clear()
        maintenance.reconcile(rig.rt, now=later(2))
        assert rig.payment(payment.id).state == "authorized"
        assert min(assert_bounded(proxy)) == bound + per_read  # went on from there
    assert rig.run(job) == "succeeded"
    assert money_invariants(rig, {conn: 100_000}) == []


@contextmanager
def paywall(
    engine: Engine,
    tmp_path: Path,
    chain: DevChainInfo,
    client: ChainClient,
    seller: LocalAccount,
    operator: LocalAccount,
    *,
    rpc_url: str | None = None,
    **settings: Any,
) -> Iterator[dict[str, Any]]:
    """A paywall (its own runtime with ``settings``) whose facilitator operates the escrow with
    ``operator``'s key; the seller's connection reads the chain at ``rpc_url``."""
    with (
        operator_facilitator(chain, operator, client) as (fac, mode, _),
        paywall_app(engine, tmp_path, facilitator_timeout_s=2.0, **settings) as (rt, server),
    ):
        with transaction(rt.engine) as s:
            conn = connections.create(
                s,
                rt.vault,
                ConnectionCreate.model_validate(
                    {
                        "name": "seller", "network": chain.network,
                        "rpc_url": rpc_url or chain.rpc_url, "facilitator_url": fac.url,
                        "asset": chain.token, "private_key": "0x" + seller.key.hex(),
                    }
                ),
            ).id  # fmt: skip
        yield {"rt": rt, "server": server, "mode": mode, "conn": conn}


def hold(setup: dict[str, Any], payer: LocalAccount, receiver: str) -> tuple[str, dict[str, str]]:
    """Pay a manual-capture paywall (on-chain escrow): the payment id and the payment header
    (the paywall may answer 503 pending; the same header asks again)."""
    rt, server = setup["rt"], setup["server"]
    rid = offer(rt, setup["conn"], capture="manual", pay_to=receiver, amount="700")
    first = httpx.get(url_of(server, rid))
    header = pay_header(payer, first)
    paid = httpx.get(url_of(server, rid), headers=header, timeout=30)
    assert paid.status_code in (200, 503), paid.text
    return paid.headers["x-x402c-payment-id"], {"url": url_of(server, rid), **header}


@pytest.mark.chain
def test_an_operation_settled_from_the_history_reads_it_in_bounded_ranges(
    engine: Engine,
    tmp_path: Path,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:
    """A capture done but never answered is found in the payment's history, read from the
    bound recorded when the paywall created the payment, far from genesis."""
    mine(chain_client, 150)
    with (
        RpcProxy(chain.rpc_url, max_range=MAX_RANGE) as proxy,
        paywall(
            engine, tmp_path, chain, chain_client, accounts[13], accounts[18],
            rpc_url=proxy.url, rpc_max_log_range=MAX_RANGE,
        ) as setup,
    ):  # fmt: skip
        rt, mode = setup["rt"], setup["mode"]
        receiver = Account.create().address
        pid, _ = hold(setup, accounts[6], receiver)
        held = payment_row(rt, pid)
        assert held.state == "authorized"
        assert 0 < int((held.escrow or {})["from_block"]) <= chain_client.block_number()
        mine(chain_client, 100)
        ctx = load_connection(rt, setup["conn"])
        mode["settle"] = "swallow"  # the capture is mined, the answer lost
        with pytest.raises(SettlementPending):
            escrow.release(rt, ctx, pid, amount=250, key="job-c")
        mine(chain_client, 100)
        mode["settle"] = "real"
        proxy.clear()
        resumed = escrow.release(rt, ctx, pid, amount=250, key="job-c")
        assert resumed.state == "captured" and resumed.captured_amount == 250
        assert chain_client.token_balance(chain.token, receiver) == 250  # not captured twice
        assert_bounded(proxy)


# ------------------------------------------------------------------ confirmations


@pytest.mark.chain
@pytest.mark.postgres
def test_an_escrow_collection_counts_only_once_it_has_the_networks_confirmations(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    """Three confirmations: the collection mined at block b is applied once the head reaches
    b + 2 — not by the send (pending meanwhile), not by a reconcile pass before — and exactly
    once whoever applies it."""
    configure(rig, network_confirmations={rig.chain.network: 3})
    conn = rig.connection(accounts[6], {"budget_day": "100000"})
    with shop(rig, accounts[12].address, amount=20_000) as seller:
        job, status = pay(rig, conn, seller.url)
    assert seller.seen[0]["success"] is True  # mined: one confirmation
    assert status not in ("succeeded", "failed")  # pending: retried
    payment = rig.payment_of(job)
    assert payment.state == "settling" and rig.reservation(payment.id) == "held"
    assert rig.job_row(job).error["code"] == "settlement_pending"  # type: ignore[index]

    maintenance.reconcile(rig.rt, now=later(2))
    assert rig.payment(payment.id).state == "settling"
    mine(rig.client, 1)  # two confirmations
    maintenance.reconcile(rig.rt, now=later(2))
    assert rig.run(job) not in ("succeeded", "failed")
    assert rig.payment(payment.id).state == "settling"
    assert count_events(rig, "payment.authorized", payment.id) == 0

    mine(rig.client, 1)  # three
    maintenance.reconcile(rig.rt, now=later(2))
    assert rig.payment(payment.id).state == "authorized"
    assert rig.run(job) == "succeeded"
    maintenance.reconcile(rig.rt, now=later(3))
    assert count_events(rig, "payment.authorized", payment.id) == 1
    assert money_invariants(rig, {conn: 100_000}) == []


@pytest.mark.chain
def test_the_paywall_and_a_capture_wait_for_the_networks_confirmations(
    engine: Engine,
    tmp_path: Path,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:
    """The paywall's collection and the seller's capture are mined at once, but count only with
    three confirmations: the payer is asked to retry, the capture answers pending (its job is
    retried) and is never sent again; then each is applied once."""
    with paywall(
        engine, tmp_path, chain, chain_client, accounts[13], accounts[18],
        network_confirmations={chain.network: 3},
    ) as setup:  # fmt: skip
        rt = setup["rt"]
        receiver = Account.create().address
        pid, again = hold(setup, accounts[6], receiver)
        assert payment_row(rt, pid).state == "settling"  # mined, not deep enough yet
        url = again.pop("url")
        assert httpx.get(url, headers=again, timeout=30).status_code == 503
        mine(chain_client, 2)
        assert httpx.get(url, headers=again, timeout=30).status_code == 200
        assert payment_row(rt, pid).state == "authorized"

        ctx = load_connection(rt, setup["conn"])
        with pytest.raises(SettlementPending):
            escrow.release(rt, ctx, pid, amount=300, key="job-a")
        op = escrow_operator.operations(payment_row(rt, pid))[0]
        assert (op["status"], op["type"]) == ("pending", "capture") and op["tx_hash"]
        mine(chain_client, 1)
        with pytest.raises(SettlementPending):  # the retry reads, sends nothing
            escrow.release(rt, ctx, pid, amount=300, key="job-a")
        assert payment_row(rt, pid).state == "authorized"
        assert chain_client.token_balance(chain.token, receiver) == 300  # mined once
        mine(chain_client, 1)
        captured = escrow.release(rt, ctx, pid, amount=300, key="job-a")
        assert captured.state == "captured" and captured.captured_amount == 300
        maintenance.reconcile(rt, now=later(2))
        assert events_of(rt.engine, "payment.captured", pid) == 1
        assert events_of(rt.engine, "payment.authorized", pid) == 1
        assert chain_client.token_balance(chain.token, receiver) == 300


@pytest.mark.chain
def test_an_unanswered_capture_not_yet_confirmed_is_pending_and_never_sent_again(
    engine: Engine,
    tmp_path: Path,
    chain: DevChainInfo,
    chain_client: ChainClient,
    accounts: list[LocalAccount],
) -> None:
    """The capture is mined but its answer lost; the history shows it, unconfirmed. Sending it
    again would capture twice: the retry answers pending until the event counts."""
    with paywall(
        engine, tmp_path, chain, chain_client, accounts[13], accounts[18],
        network_confirmations={chain.network: 3},
    ) as setup:  # fmt: skip
        rt, mode = setup["rt"], setup["mode"]
        receiver = Account.create().address
        pid, again = hold(setup, accounts[6], receiver)
        url = again.pop("url")
        mine(chain_client, 2)
        assert httpx.get(url, headers=again, timeout=30).status_code == 200
        ctx = load_connection(rt, setup["conn"])
        mode["settle"] = "swallow"
        with pytest.raises(SettlementPending):
            escrow.release(rt, ctx, pid, amount=250, key="job-c")
        mode["settle"] = "real"
        with pytest.raises(SettlementPending):  # seen in the history, not deep enough
            escrow.release(rt, ctx, pid, amount=250, key="job-c")
        assert chain_client.token_balance(chain.token, receiver) == 250
        mine(chain_client, 2)
        resumed = escrow.release(rt, ctx, pid, amount=250, key="job-c")
        assert resumed.state == "captured" and resumed.captured_amount == 250
        assert chain_client.token_balance(chain.token, receiver) == 250  # never twice
        assert events_of(rt.engine, "payment.captured", pid) == 1
