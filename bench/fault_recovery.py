"""Recovery times after each fault of issue 10, on the real stack (not a test: it prints numbers).

Stack: a fresh anvil, our local facilitator over HTTP on a fixed loopback port (receipt timeout
1 s), PostgreSQL (a throw-away database), Redis (database ``X402C_BENCH_REDIS_DB``, default 3),
one real ``x402c worker`` process (8 threads). No beat: what is measured is what the task retries
and the broker do on their own.

For each fault: N direct sends are queued, the fault is made, then healed; the clock runs from
the moment the fault ends (or, for a dropped connection and a killed worker, from the fault
itself) until every job finished and no payment is in flight. The money is checked too: each
payment's state matches the chain.

    .venv/bin/python bench/fault_recovery.py
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.facilitator_app import create_facilitator_app  # noqa: E402
from connector.chain import ChainClient  # noqa: E402
from connector.connections import service as connections  # noqa: E402
from connector.connections.schemas import ConnectionCreate  # noqa: E402
from connector.devchain.deploy import dev_accounts, start_devchain  # noqa: E402
from connector.facilitator.local import LocalFacilitator  # noqa: E402
from connector.jobs import start_job  # noqa: E402
from connector.runtime import Runtime  # noqa: E402
from connector.settings import Settings  # noqa: E402
from connector.storage import migrate  # noqa: E402
from connector.storage.db import make_engine, transaction  # noqa: E402
from connector.storage.models.payments import Job, Payment  # noqa: E402
from connector.vault import MasterKeyRing  # noqa: E402
from tests.fixtures.servers import LiveServer, free_port  # noqa: E402
from workers.celery_app import make_celery  # noqa: E402

PG_ADMIN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
N = 8


def wait(predicate: Callable[[], bool], timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


class Bench:
    def __init__(self) -> None:
        self.node, self.chain = start_devchain(fund_count=5)
        self.client = ChainClient(self.chain.rpc_url)
        self.accounts = dev_accounts(20)
        self.db = f"x402c_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/"
        redis_db = os.environ.get("X402C_BENCH_REDIS_DB", "3")
        self.env = {
            "X402C_DATABASE_URL": url + self.db,
            "X402C_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}",
            "X402C_MASTER_KEYS": MasterKeyRing.generate_spec("b1"),
            "X402C_DATA_DIR": tempfile.mkdtemp(),
            "X402C_BROKER_VISIBILITY_TIMEOUT_S": os.environ.get("X402C_BENCH_VISIBILITY_S", "180"),
            "X402C_FACILITATOR_TIMEOUT_S": "5",
            "X402C_OUTBOUND_ALLOW_LOOPBACK": "true",  # anvil and the facilitator on loopback
        }
        redis.Redis.from_url(self.env["X402C_BROKER_URL"]).flushdb()
        settings = Settings(
            database_url=self.env["X402C_DATABASE_URL"],
            broker_url=self.env["X402C_BROKER_URL"],
            master_keys=self.env["X402C_MASTER_KEYS"],
            data_dir=Path(self.env["X402C_DATA_DIR"]),
        )
        self.rt = Runtime(settings=settings, engine=make_engine(self.env["X402C_DATABASE_URL"]))
        migrate.upgrade(self.rt.engine)
        self.celery = make_celery(settings)
        self.port = free_port()
        self.server: LiveServer | None = None
        self.facilitator_up()
        with transaction(self.rt.engine) as s:
            self.conn_id = connections.create(
                s,
                self.rt.vault,
                ConnectionCreate.model_validate(
                    {
                        "name": "bench", "network": self.chain.network,
                        "rpc_url": self.chain.rpc_url,
                        "facilitator_url": f"http://127.0.0.1:{self.port}",
                        "asset": self.chain.token,
                        "private_key": "0x" + self.accounts[1].key.hex(),
                    }
                ),
            ).id  # fmt: skip
        self.worker: subprocess.Popen[bytes] | None = None

    def facilitator_up(self) -> None:
        fac = LocalFacilitator(
            self.client, self.accounts[17], network=self.chain.network,
            assets={self.chain.token}, receipt_timeout_s=1.0,
        )  # fmt: skip
        self.server = LiveServer(create_facilitator_app(fac), port=self.port).start()

    def facilitator_down(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "worker", "--concurrency", "8"],
            cwd=ROOT, env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def kill_worker(self, sig: int = signal.SIGKILL) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, sig)
            self.worker.wait(timeout=30)
        self.worker = None

    def sends(self, n: int = N, amount: int = 10) -> list[str]:
        with transaction(self.rt.engine) as s:
            ids = [
                start_job(
                    s, connection_id=self.conn_id, action="send",
                    body={"to": self.accounts[11].address, "amount": str(amount)},
                    idempotency_key=None,
                ).job.id
                for _ in range(n)
            ]  # fmt: skip
        for job_id in ids:
            self.celery.send_task("x402c.run_job", args=[job_id])
        return ids

    def jobs(self, ids: list[str]) -> list[Job]:
        with transaction(self.rt.engine) as s:
            return list(s.execute(select(Job).where(Job.id.in_(ids))).scalars())  # type: ignore[attr-defined]

    def payments(self, ids: list[str]) -> list[Payment]:
        with transaction(self.rt.engine) as s:
            return list(
                s.execute(
                    select(Payment).where(Payment.idempotency_key.in_(ids))  # type: ignore[union-attr]
                ).scalars()
            )

    def all_done(self, ids: list[str]) -> bool:
        jobs = self.jobs(ids)
        if any(j.status not in ("succeeded", "failed") for j in jobs):
            return False
        return all(p.state not in ("authorized", "settling") for p in self.payments(ids))

    def check(self, ids: list[str]) -> str:
        bad = []
        for p in self.payments(ids):
            used = self.client.authorization_state(p.asset, p.payer, p.nonce)
            if used != (p.state == "settled"):
                bad.append(f"{p.id} {p.state} used={used}")
        states = sorted({j.status for j in self.jobs(ids)})
        return "money ok" if not bad else f"MISMATCH {bad}" + f" jobs={states}"

    def drop_db(self) -> int:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            return len(
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.db,),
                ).fetchall()
            )

    def close(self) -> None:
        self.kill_worker(signal.SIGTERM)
        self.facilitator_down()
        self.rt.close()
        self.node.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def run(bench: Bench) -> dict[str, Any]:
    results: dict[str, Any] = {}
    bench.start_worker()
    warm = bench.sends(2)
    assert wait(lambda: bench.all_done(warm), 60) is not None, "worker did not start"

    # 1. slow chain: mining paused 5 s after every send is pending
    bench.client.rpc("evm_setAutomine", [False])
    ids = bench.sends()
    wait(lambda: len([p for p in bench.payments(ids) if p.tx_hash]) == N, 60)
    time.sleep(5)
    bench.client.rpc("evm_setAutomine", [True])
    bench.client.rpc("evm_mine", [])
    results["slow chain (resume mining -> all settled)"] = (
        wait(lambda: bench.all_done(ids), 300),
        bench.check(ids),
    )

    # 2. facilitator outage of 5 s, restarted on the same port with an empty cache
    bench.facilitator_down()
    ids = bench.sends()
    time.sleep(5)
    bench.facilitator_up()
    results["facilitator outage 5 s (restart -> all settled)"] = (
        wait(lambda: bench.all_done(ids), 300),
        bench.check(ids),
    )

    # 3. database connections dropped in the middle of a batch
    ids = bench.sends(2 * N)
    wait(lambda: any(p.state == "settled" for p in bench.payments(ids)), 60)
    dropped = bench.drop_db()
    results[f"db connections dropped ({dropped} backends) -> all settled"] = (
        wait(lambda: bench.all_done(ids), 300),
        bench.check(ids),
    )

    # 4. kill -9 of the worker mid-batch, a new worker started at once (no beat)
    ids = bench.sends(2 * N)
    wait(lambda: any(p.state == "settled" for p in bench.payments(ids)), 60)
    bench.kill_worker()
    killed = time.monotonic()
    bench.start_worker()
    took = wait(lambda: bench.all_done(ids), 600)
    results[
        f"worker kill -9, no beat, visibility {bench.env['X402C_BROKER_VISIBILITY_TIMEOUT_S']} s "
        "(kill -> all finished)"
    ] = (None if took is None else time.monotonic() - killed, bench.check(ids))
    return results


def main() -> None:
    bench = Bench()
    try:
        for name, (seconds, money) in run(bench).items():
            shown = "not recovered" if seconds is None else f"{seconds:.1f} s"
            print(f"{name}: {shown} ({money})")
    finally:
        bench.close()


if __name__ == "__main__":
    main()
