"""`send` end to end (API job -> Celery worker on Redis -> facilitator -> anvil) with 1 and 2
workers, next to the bare official-SDK loop (sign -> verify -> settle) in the same run.

Everything runs on this machine: anvil, our facilitator in its own process, PostgreSQL, Redis,
and `x402c worker` processes. Latency of ours is job creation -> job finished, as a workflow
sees it, for a batch queued at once.

Fairness: anvil's transaction rate falls as its chain grows (measured here: ~185/s raw
transfers on a fresh chain, ~65/s after 1,800), so every measured run gets a fresh chain and a
fresh facilitator, and the configurations are interleaved over several rounds; the medians are
reported with every run printed.

Isolation: a throwaway PostgreSQL database (created and dropped here) and a Redis database that
must be empty when the run starts (``BENCH_REDIS_URL``, default DB 15; the bench refuses a
database holding anyone's keys and, at the end, deletes only the Celery keys it created). It
never flushes a database. ``--smoke`` runs a tiny size (the test suite does, so the bench cannot
rot) and records nothing unless ``BENCH_RESULTS_DIR`` is set.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import redis
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select
from sqlmodel import col
from x402 import x402ClientSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentRequired, PaymentRequirements

from api.stack import free_port
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.deploy import DevChainInfo, dev_accounts, start_devchain
from connector.jobs import start_job
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.payments import Job
from connector.vault import MasterKeyRing
from connector.x402.requirement import Requirement
from workers.celery_app import make_celery

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record

SMOKE = "--smoke" in sys.argv
ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
N = int(os.environ.get("BENCH_N", "4" if SMOKE else "300"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if SMOKE else "3"))
ROOT = Path(__file__).resolve().parents[1]
BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
#: What Celery and kombu write in the broker/result database (a run's own keys, nothing else).
OWN_KEY_PATTERNS = ("celery", "_kombu.*", "unacked*", "celery-task-meta-*", "*.celery.pidbox")
Run = tuple[float, list[float]]  # (payments per second, latencies in ms)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


@dataclass
class Chain:
    info: DevChainInfo
    facilitator_url: str
    accounts: list[LocalAccount]


@contextmanager
def fresh_chain() -> Iterator[Chain]:
    """A new anvil with DevUSD and our facilitator in its own process (`x402c facilitator`)."""
    state = Path(tempfile.mkdtemp()) / "devchain.json"
    node, info = start_devchain(fund_count=10, state_file=state)
    port = free_port()
    fac = subprocess.Popen(
        [
            *(sys.executable, "-m", "api.cli", "facilitator"),
            *("--port", str(port), "--devchain-state", str(state)),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield Chain(info, url, dev_accounts(20))
    finally:
        fac.terminate()
        fac.wait(timeout=20)
        node.stop()


def sdk_loop(chain: Chain) -> Run:
    """The baseline: sign -> verify -> settle with the official SDK, one payment at a time."""
    info = chain.info
    req = Requirement(
        scheme="exact",
        network=info.network,
        amount=1,
        asset=info.token,
        pay_to=chain.accounts[19].address,
        max_timeout_seconds=600,
        extra={"name": info.token_name, "version": info.token_version},
    )
    sdk = x402ClientSync()
    register_exact_evm_client(sdk, chain.accounts[5], networks=info.network)
    sdk.set_spend_controls({"allowed_assets": True})
    facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=chain.facilitator_url))
    offer = PaymentRequired(accepts=[PaymentRequirements.model_validate(req.to_v2())])
    count = N  # the same number of payments as ours: the chain grows the same way
    lat = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        payload = sdk.create_payment_payload(offer)
        assert facilitator.verify(payload, offer.accepts[0]).is_valid
        assert facilitator.settle(payload, offer.accepts[0]).success
        lat.append((time.perf_counter() - t0) * 1000)
    return count / (time.perf_counter() - start), lat


def our_send(rt: Runtime, env: dict[str, str], chain: Chain, workers: int) -> Run:
    info = chain.info
    with transaction(rt.engine) as s:
        conn_id = connections.create(
            s,
            rt.vault,
            ConnectionCreate.model_validate(
                {
                    "name": f"bench {workers} {secrets.token_hex(3)}",
                    "network": info.network,
                    "rpc_url": info.rpc_url,
                    "facilitator_url": chain.facilitator_url,
                    "asset": info.token,
                    "private_key": "0x" + chain.accounts[6].key.hex(),
                }
            ),
        ).id
    app = make_celery(rt.settings)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "api.cli", "worker", "--concurrency", "8"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    try:
        # Measure from the moment every worker answers a ping (start-up is not throughput).
        for _ in range(300):
            if len(app.control.ping(timeout=0.5) or []) >= workers:
                break
        else:
            raise SystemExit("workers did not come up")
        start = time.perf_counter()
        run_tag = secrets.token_hex(6)
        with transaction(rt.engine) as s:
            ids = [
                start_job(
                    s,
                    connection_id=conn_id,
                    action="send",
                    body={"to": chain.accounts[19].address, "amount": "1"},
                    idempotency_key=f"bench-{run_tag}-{i}",  # money moves: a key is required
                ).job.id
                for i in range(N)
            ]
        for job_id in ids:
            app.send_task("x402c.run_job", args=[job_id])
        # Poll cheaply (a COUNT every 100 ms) so the measuring process does not steal the CPU
        # the workers need on a 2-core machine.
        finished = col(Job.status).in_(("succeeded", "failed"))
        while True:
            with transaction(rt.engine) as s:
                done = s.execute(
                    select(func.count()).where(col(Job.connection_id) == conn_id, finished)
                ).scalar_one()
            if done >= N:
                break
            time.sleep(0.1)
        elapsed = time.perf_counter() - start
        with transaction(rt.engine) as s:
            jobs = list(s.execute(select(Job).where(col(Job.connection_id) == conn_id)).scalars())
        assert all(j.status == "succeeded" for j in jobs), {j.status for j in jobs}
        lat = [(j.updated_at - j.created_at).total_seconds() * 1000 for j in jobs]
        return N / elapsed, lat
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        app.close()  # the producer's pooled broker connections


def summary(runs: list[Run]) -> tuple[float, float, float, str]:
    rates = [r for r, _ in runs]
    lat = [x for _, values in runs for x in values]
    return (
        statistics.median(rates),
        statistics.median(lat),
        pct(lat, 0.95),
        " ".join(f"{r:.1f}" for r in rates),
    )


def main() -> None:
    db = "x402c_bench_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + db
    broker = redis.Redis.from_url(BROKER)
    if broker.dbsize():
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        raise SystemExit(
            f"Redis {BROKER} holds {broker.dbsize()} keys: not ours to touch. Point "
            "BENCH_REDIS_URL at an empty database."
        )
    try:
        keys = MasterKeyRing.generate_spec("s1")
        settings = Settings(
            database_url=url,
            broker_url=BROKER,
            master_keys=keys,
            data_dir=Path(tempfile.mkdtemp()),
            outbound_allow_loopback=True,  # chain and facilitator are on loopback
        )
        rt = Runtime(settings=settings, engine=make_engine(url))
        migrate.upgrade(rt.engine)
        env = {
            **os.environ,
            "X402C_DATABASE_URL": url,
            "X402C_BROKER_URL": BROKER,
            "X402C_MASTER_KEYS": keys,
            "X402C_OUTBOUND_ALLOW_LOOPBACK": "true",
            "X402C_LOG_LEVEL": "WARNING",
        }
        results: dict[int, list[Run]] = {0: [], 1: [], 2: []}
        for _ in range(ROUNDS):
            for workers in (0, 1, 2):
                with fresh_chain() as chain:
                    run = sdk_loop(chain) if workers == 0 else our_send(rt, env, chain, workers)
                results[workers].append(run)
        print(
            f"send end to end, direct payments (Redis, PostgreSQL, anvil); {ROUNDS} interleaved "
            f"rounds, each run on a fresh chain; medians of runs; "
            f"{N} payments per run"
        )
        sdk_rate, p50, p95, spread = summary(results[0])
        print(
            f"  bare SDK loop sign->verify->settle (sequential): {sdk_rate:6.1f}/s  "
            f"p50 {p50:5.0f} ms  p95 {p95:5.0f} ms   runs: {spread}"
        )
        for workers in (1, 2):
            rate, p50, p95, spread = summary(results[workers])
            print(
                f"  our send, {workers} worker(s) x 8 threads:            {rate:6.1f}/s  "
                f"p50 {p50:5.0f} ms  p95 {p95:5.0f} ms  ({rate / sdk_rate:.2f}x SDK loop)   "
                f"runs: {spread}"
            )
        print("  (latency of ours = job queued -> finished, so it includes queueing of the batch)")
        rows = [
            record.row(
                f"`send` end to end, {workers} worker(s) x 8 threads (Redis, PostgreSQL)",
                f"{summary(results[workers])[0]:.1f}/s",
                f"bare SDK loop sign->verify->settle {sdk_rate:.1f}/s",
                summary(results[workers])[0] / sdk_rate,
            )
            for workers in (1, 2)
        ]
        record.write("send", rows, smoke=SMOKE)
    finally:
        for pattern in OWN_KEY_PATTERNS:  # the database was empty: these keys are this run's
            for key in broker.scan_iter(match=pattern, count=500):
                broker.delete(key)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
