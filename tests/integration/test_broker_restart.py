"""A Redis broker restarted in the middle of a batch of sends (kill -9, no persistence).

The broker is this test's own ``redis-server`` on a free loopback port, so killing it touches
nothing else. Redis here keeps nothing on disk: the restart loses every queued message and the
record of the unacknowledged ones. The job rows in PostgreSQL are the truth: the running worker
reconnects by itself, beat's stale-job sweep sends the lost jobs again, and afterwards every job
agrees with its payment, every payment settled exactly once, and the chain shows exactly the sum.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from eth_account.signers.local import LocalAccount
from sqlalchemy import select

from connector.chain import ChainClient
from connector.devchain.deploy import DevChainInfo
from connector.payments.maintenance import requeue_stale_jobs
from connector.storage.db import transaction
from connector.storage.models.payments import Job, Payment
from tests.integration.test_celery_redis_worker import (
    enqueue_sends,
    settings_of,
    setup,
    start_worker,
    states,
    stop,
    wait_for,
)
from workers.celery_app import make_celery
from workers.wiring import celery_dispatch

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.slow]


class OwnRedis:
    """A throwaway ``redis-server`` on 127.0.0.1 that can be killed and started again."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None
        self.proc = subprocess.Popen(
            [
                server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        assert wait_for(lambda: self._answers(client), 20), "redis-server did not start"

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def env(pg_database: str, tmp_path: Path, own_redis: OwnRedis) -> dict[str, str]:
    from connector.vault import MasterKeyRing

    return {
        "X402C_DATABASE_URL": pg_database,
        "X402C_BROKER_URL": own_redis.url,
        "X402C_MASTER_KEYS": MasterKeyRing.generate_spec("b1"),
        "X402C_DATA_DIR": str(tmp_path),
        "X402C_BROKER_VISIBILITY_TIMEOUT_S": "4",
        "X402C_BROKER_RESTORE_INTERVAL_S": "1",
        "X402C_BROKER_TIMEOUT_S": "2",
        "X402C_SEND_ALLOW_LOOPBACK": "true",
        "X402C_WEBHOOK_ALLOW_LOOPBACK": "true",
    }


def test_a_broker_restart_mid_batch_loses_no_job_and_pays_each_once(
    env: dict[str, str],
    own_redis: OwnRedis,
    chain: DevChainInfo,
    facilitator_url: str,
    accounts: list[LocalAccount],
) -> None:
    payer, payee = accounts[3], accounts[15].address
    rt, conn_id = setup(env, chain, facilitator_url, payer, {})
    client = ChainClient(chain.rpc_url)
    before = client.token_balance(chain.token, payee)
    job_ids = enqueue_sends(rt, env, conn_id, payee, 60, 100)
    worker = start_worker(env, concurrency=4)
    try:
        assert wait_for(lambda: list(states(rt, conn_id).values()).count("settled") >= 3, 60)
        own_redis.kill()  # mid-batch: queued messages and the unacked records are gone
        unfinished = len(job_ids) - list(states(rt, conn_id).values()).count("settled")
        time.sleep(1.0)  # the worker and its running tasks meet a dead broker
        own_redis.start()  # same port, empty
        assert redis.Redis.from_url(own_redis.url).dbsize() == 0

        # What beat does every 30 s: jobs whose message was lost are sent again from their rows.
        app = make_celery(settings_of(env))
        rt.dispatch = celery_dispatch(app)

        def all_done() -> bool:
            requeue_stale_jobs(rt, now=datetime.now(UTC) + timedelta(minutes=5))
            with transaction(rt.engine) as s:
                rows = s.execute(select(Job).where(Job.connection_id == conn_id)).scalars().all()
                return all(j.status in ("succeeded", "failed") for j in rows)

        finished = wait_for(all_done, 120)
        alive = worker.poll() is None
    finally:
        stop(worker)
    with transaction(rt.engine) as s:
        mine = select(Job).where(Job.connection_id == conn_id)
        jobs = {j.id: j for j in s.execute(mine).scalars()}
        payments = {
            p.id: p
            for p in s.execute(select(Payment).where(Payment.connection_id == conn_id)).scalars()
        }
    assert unfinished > 0, "the batch finished before the broker died: nothing was tested"
    assert finished, [(j.status, j.attempts, (j.error or {}).get("type")) for j in jobs.values()]
    assert alive, "the worker died with the broker instead of reconnecting"
    assert set(jobs) == set(job_ids)
    # Each job succeeded with one payment of its own, and reports that payment as it is.
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert len(payments) == 60 and {j.payment_id for j in jobs.values()} == set(payments)
    for job in jobs.values():
        payment = payments[str(job.payment_id)]
        assert payment.state == "settled"
        reported = (job.result or {}).get("payment") or {}
        assert (reported.get("state"), reported.get("tx_hash")) == ("settled", payment.tx_hash)
    # Money moved exactly once per payment: distinct nonces, each used on-chain, the exact sum.
    assert len({p.nonce for p in payments.values()}) == 60
    for p in payments.values():
        assert client.authorization_state(chain.token, str(p.payer), str(p.nonce))
    assert client.token_balance(chain.token, payee) == before + 60 * 100
