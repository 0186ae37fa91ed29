"""Real Celery workers on Redis, PostgreSQL, anvil and the local facilitator.

* kill -9 a worker in the middle of a batch of sends, restart it: every payment ends settled
  exactly once, the chain shows exactly the sum, nothing is stuck;
* 50 parallel sends against a budget on PostgreSQL never spend more than the limit.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from connector.chain import ChainClient
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.deploy import DevChainInfo
from connector.jobs import start_job
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.payments import Job, Payment
from connector.vault import MasterKeyRing
from tests.fixtures.servers import LiveServer
from workers.celery_app import make_celery

pytestmark = [pytest.mark.chain, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(pg_database: str, tmp_path: Path, worker_id: str) -> Iterator[dict[str, str]]:
    # One Redis database per xdist worker: two tests running at once must never share a queue
    # (a worker of one would eat the other's messages, and a flushdb would drop them).
    # X402C_TEST_REDIS_DB_BASE moves the range, so two checkouts can run their suites at once.
    base = int(os.environ.get("X402C_TEST_REDIS_DB_BASE", "1"))
    db_number = base + (int(worker_id[2:]) if worker_id.startswith("gw") else 0)
    assert 0 <= db_number < 16, "Redis has databases 0..15; pick another X402C_TEST_REDIS_DB_BASE"
    values = {
        "X402C_DATABASE_URL": pg_database,
        "X402C_BROKER_URL": f"redis://127.0.0.1:6379/{db_number}",
        "X402C_MASTER_KEYS": MasterKeyRing.generate_spec("r1"),
        "X402C_DATA_DIR": str(tmp_path),
        "X402C_BROKER_VISIBILITY_TIMEOUT_S": "4",
        "X402C_BROKER_RESTORE_INTERVAL_S": "1",
        "X402C_SEND_ALLOW_LOOPBACK": "true",
        "X402C_WEBHOOK_ALLOW_LOOPBACK": "true",
    }
    import redis

    redis.Redis.from_url(values["X402C_BROKER_URL"]).flushdb()
    yield values
    redis.Redis.from_url(values["X402C_BROKER_URL"]).flushdb()


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(
        database_url=env["X402C_DATABASE_URL"],
        broker_url=env["X402C_BROKER_URL"],
        master_keys=env["X402C_MASTER_KEYS"],
        data_dir=Path(env["X402C_DATA_DIR"]),
        broker_visibility_timeout_s=4,
    )


def start_worker(env: dict[str, str], concurrency: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "worker", "--concurrency", str(concurrency)],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def setup(
    env: dict[str, str],
    chain: DevChainInfo,
    facilitator_url: str,
    payer: LocalAccount,
    policy: dict[str, Any],
) -> tuple[Runtime, str]:
    settings = settings_of(env)
    rt = Runtime(settings=settings, engine=make_engine(env["X402C_DATABASE_URL"]))
    migrate.upgrade(rt.engine)
    with transaction(rt.engine) as s:
        conn = connections.create(
            s,
            rt.vault,
            ConnectionCreate.model_validate(
                {
                    "name": "worker test", "network": chain.network, "rpc_url": chain.rpc_url,
                    "facilitator_url": facilitator_url, "asset": chain.token,
                    "private_key": "0x" + payer.key.hex(), "policy": policy,
                }
            ),
        )  # fmt: skip
    return rt, conn.id


def enqueue_sends(
    rt: Runtime, env: dict[str, str], conn_id: str, payee: str, n: int, amount: int
) -> list[str]:
    app = make_celery(settings_of(env))
    ids = []
    with transaction(rt.engine) as s:
        for _ in range(n):
            body = {"to": payee, "amount": str(amount)}
            ids.append(
                start_job(
                    s,
                    connection_id=conn_id,
                    action="send",
                    body=body,
                    idempotency_key=f"batch-{secrets.token_hex(8)}",
                ).job.id
            )
    for job_id in ids:
        app.send_task("x402c.run_job", args=[job_id])
    return ids


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def states(rt: Runtime, conn_id: str) -> dict[str, str]:
    with transaction(rt.engine) as s:
        rows = s.execute(select(Payment).where(Payment.connection_id == conn_id)).scalars()
        return {p.id: p.state for p in rows}


def test_kill_9_mid_batch_never_pays_twice_and_loses_nothing(
    env: dict[str, str], chain: DevChainInfo, facilitator_url: str, accounts: list[LocalAccount]
) -> None:
    payer, payee = accounts[1], accounts[13].address
    rt, conn_id = setup(env, chain, facilitator_url, payer, {})
    client = ChainClient(chain.rpc_url)
    before = client.token_balance(chain.token, payee)
    enqueue_sends(rt, env, conn_id, payee, 16, 100)
    worker = start_worker(env, concurrency=4)
    try:
        assert wait_for(lambda: list(states(rt, conn_id).values()).count("settled") >= 3, 60)
        stop(worker, signal.SIGKILL)  # mid-batch: some tasks were running, unacked
    finally:
        stop(worker, signal.SIGKILL)
    worker = start_worker(env, concurrency=4)
    # What beat does every 30 s: a message lost in the kill (taken from Redis but not yet
    # recorded as unacknowledged) is re-sent from the job row, the source of truth.
    from datetime import UTC, datetime, timedelta

    from connector.payments.maintenance import requeue_stale_jobs

    app = make_celery(settings_of(env))
    rt.dispatch = lambda task, args: app.send_task(task, args=list(args))
    try:
        time.sleep(5)
        requeue_stale_jobs(rt, now=datetime.now(UTC) + timedelta(minutes=5))

        def all_done() -> bool:
            with transaction(rt.engine) as s:
                rows = s.execute(select(Job).where(Job.connection_id == conn_id)).scalars().all()
                return all(j.status in ("succeeded", "failed") for j in rows)

        if not wait_for(all_done, 90):
            import redis

            with transaction(rt.engine) as s:
                rows = s.execute(select(Job).where(Job.connection_id == conn_id)).scalars().all()
                info = [(j.status, j.attempts, (j.error or {}).get("detail")) for j in rows]
            r = redis.Redis.from_url(env["X402C_BROKER_URL"])
            raise AssertionError(f"{info} keys={r.keys()} unacked={r.hlen('unacked')}")
    finally:
        stop(worker)
    final = states(rt, conn_id)
    assert len(final) == 16  # one payment per job, never a second one for a retried job
    assert set(final.values()) == {"settled"}, final
    with transaction(rt.engine) as s:
        mine = list(s.execute(select(Payment).where(Payment.connection_id == conn_id)).scalars())
        nonces = {p.nonce for p in mine}
        hashes = {p.tx_hash for p in mine}
    assert len(nonces) == 16 and len(hashes) == 16
    assert client.token_balance(chain.token, payee) == before + 16 * 100


def test_fifty_parallel_sends_never_exceed_the_budget(
    env: dict[str, str], chain: DevChainInfo, facilitator_url: str, accounts: list[LocalAccount]
) -> None:
    payer, payee = accounts[2], accounts[14].address
    rt, conn_id = setup(env, chain, facilitator_url, payer, {"budget_day": "2000"})
    client = ChainClient(chain.rpc_url)
    before = client.token_balance(chain.token, payee)
    enqueue_sends(rt, env, conn_id, payee, 50, 100)
    workers = [start_worker(env, concurrency=8), start_worker(env, concurrency=8)]
    try:
        finished = ("settled", "rejected")

        def all_finished() -> bool:
            return sum(v in finished for v in states(rt, conn_id).values()) == 50

        if not wait_for(all_finished, 120):
            from collections import Counter

            with transaction(rt.engine) as s:
                jobs = Counter((j.status, j.attempts) for j in s.execute(select(Job)).scalars())
                odd = [
                    (p.state, p.failure_reason)
                    for p in s.execute(select(Payment)).scalars()
                    if p.state not in finished
                ]
            counts = Counter(states(rt, conn_id).values())
            raise AssertionError(f"{counts} jobs={jobs} odd={odd[:5]}")
    finally:
        for w in workers:
            stop(w)
    final = list(states(rt, conn_id).values())
    assert final.count("settled") == 20 and final.count("rejected") == 30
    assert client.token_balance(chain.token, payee) == before + 2000


def test_worker_delivers_signed_webhooks_woken_after_commit(
    env: dict[str, str], chain: DevChainInfo, facilitator_url: str, accounts: list[LocalAccount]
) -> None:
    received: list[dict[str, Any]] = []
    lock = threading.Lock()
    secret_holder: dict[str, str] = {}
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        event = Webhook(secret_holder["s"]).verify(await request.body(), dict(request.headers))
        with lock:
            received.append(event)
        return Response(status_code=204)

    with LiveServer(app) as server:
        rt, conn_id = setup(env, chain, facilitator_url, accounts[3], {})
        with transaction(rt.engine) as s:
            from connector.connections.schemas import ConnectionUpdate

            connections.update(
                s, rt.vault, conn_id, ConnectionUpdate(webhook_url=server.url + "/hook")
            )
            _, secret_holder["s"] = connections.rotate_webhook_secret(
                s, rt.vault, conn_id, overlap=__import__("datetime").timedelta(0)
            )
        worker = start_worker(env, concurrency=4)
        try:
            enqueue_sends(rt, env, conn_id, accounts[12].address, 3, 10)

            def settled_events() -> int:
                with lock:
                    return sum(e["type"] == "payment.settled" for e in received)

            if not wait_for(lambda: settled_events() == 3, 30):
                from connector.storage.models.events import Delivery, Event

                with transaction(rt.engine) as s:
                    ev = [
                        (e.type, e.dispatched)
                        for e in s.execute(
                            select(Event).where(Event.connection_id == conn_id)
                        ).scalars()
                    ]
                    dl = [(d.status, d.last_error) for d in s.execute(select(Delivery)).scalars()]
                raise AssertionError(f"{states(rt, conn_id)} events={ev[:8]} deliveries={dl[:5]}")
        finally:
            stop(worker)
    with lock:
        ids = [e["id"] for e in received]
    assert len(ids) == len(set(ids))  # no duplicates in the happy path
