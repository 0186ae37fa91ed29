"""`send` end to end (API job -> Celery worker on Redis -> facilitator -> anvil) with 1 and 2
workers, next to the bare official-SDK loop (sign -> verify -> settle) in the same run.

Everything runs on this machine: anvil, our facilitator in its own process, PostgreSQL, Redis,
and `x402c worker` processes. Latency is job creation -> job finished, as a workflow sees it.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import redis
from sqlalchemy import func, select
from sqlmodel import col
from x402 import x402ClientSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentRequired, PaymentRequirements

from api.stack import free_port
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.devchain.deploy import dev_accounts, start_devchain
from connector.jobs import start_job
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.payments import Job
from connector.vault import MasterKeyRing
from connector.x402.requirement import Requirement
from workers.celery_app import make_celery

ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
N = int(os.environ.get("BENCH_N", "300"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ROOT = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


def main() -> None:
    state = Path(tempfile.mkdtemp()) / "devchain.json"
    node, info = start_devchain(fund_count=6 + 2 * ROUNDS + 4, state_file=state)
    db = "x402c_bench_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + db
    port = free_port()
    fac = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api.cli",
            "facilitator",
            "--port",
            str(port),
            "--devchain-state",
            str(state),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fac_url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(100):
            try:
                if httpx.get(fac_url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        accounts = dev_accounts(20)
        req = Requirement(
            scheme="exact",
            network=info.network,
            amount=1,
            asset=info.token,
            pay_to=accounts[19].address,
            max_timeout_seconds=600,
            extra={"name": info.token_name, "version": info.token_version},
        )

        # Baseline: the bare SDK loop, sequential, against the same facilitator.
        sdk = x402ClientSync()
        register_exact_evm_client(sdk, accounts[5], networks="eip155:31337")
        sdk.set_spend_controls({"allowed_assets": True})
        sdk_fac = HTTPFacilitatorClientSync(FacilitatorConfig(url=fac_url))
        offer = PaymentRequired(accepts=[PaymentRequirements.model_validate(req.to_v2())])

        def sdk_round() -> tuple[float, list[float]]:
            lat = []
            start = time.perf_counter()
            for _ in range(N // 2):
                t0 = time.perf_counter()
                payload = sdk.create_payment_payload(offer)
                assert sdk_fac.verify(payload, offer.accepts[0]).is_valid
                assert sdk_fac.settle(payload, offer.accepts[0]).success
                lat.append((time.perf_counter() - t0) * 1000)
            return (N // 2) / (time.perf_counter() - start), lat

        keys = MasterKeyRing.generate_spec("s1")
        broker = "redis://127.0.0.1:6379/15"
        redis.Redis.from_url(broker).flushdb()
        settings = Settings(
            database_url=url, broker_url=broker, master_keys=keys, data_dir=Path(tempfile.mkdtemp())
        )
        rt = Runtime(settings=settings, engine=make_engine(url))
        migrate.upgrade(rt.engine)
        env = {
            **os.environ,
            "X402C_DATABASE_URL": url,
            "X402C_BROKER_URL": broker,
            "X402C_MASTER_KEYS": keys,
            "X402C_LOG_LEVEL": "WARNING",
        }
        app = make_celery(settings)
        results: dict[str, list[tuple[float, list[float]]]] = {"sdk": [], "1": [], "2": []}
        configs = [(r, w) for r in range(ROUNDS) for w in (0, 1, 2)]
        for round_no, workers in configs:
            if workers == 0:
                results["sdk"].append(sdk_round())
                continue
            payer = accounts[6 + (workers - 1) + 2 * round_no]
            with transaction(rt.engine) as s:
                conn_id = connections.create(
                    s,
                    rt.vault,
                    ConnectionCreate.model_validate(
                        {
                            "name": f"bench {workers} round {round_no}",
                            "network": info.network,
                            "rpc_url": info.rpc_url,
                            "facilitator_url": fac_url,
                            "asset": info.token,
                            "private_key": "0x" + payer.key.hex(),
                        }
                    ),
                ).id
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
            # Measure from the moment every worker answers a ping (start-up is not throughput).
            for _ in range(300):
                if len(app.control.ping(timeout=0.5) or []) >= workers:
                    break
            else:
                raise SystemExit("workers did not come up")
            start = time.perf_counter()
            with transaction(rt.engine) as s:
                ids = [
                    start_job(
                        s,
                        connection_id=conn_id,
                        action="send",
                        body={"to": accounts[19].address, "amount": "1"},
                        idempotency_key=None,
                    ).job.id
                    for _ in range(N)
                ]
            for job_id in ids:
                app.send_task("x402c.run_job", args=[job_id])
            # Poll cheaply (a COUNT every 100 ms) so the measuring process does not steal the
            # CPU the workers need on a 2-core machine.
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
                jobs = list(
                    s.execute(select(Job).where(col(Job.connection_id) == conn_id)).scalars()
                )
            assert all(j.status == "succeeded" for j in jobs)
            lat = [(j.updated_at - j.created_at).total_seconds() * 1000 for j in jobs]
            results[str(workers)].append((N / elapsed, lat))
            for p in procs:
                p.terminate()
                p.wait(timeout=20)
            procs = []
        print(
            f"send end to end, direct payments (Redis, PostgreSQL, anvil); {ROUNDS} interleaved "
            f"rounds, median of rounds; N={N} per run of ours, {N // 2} per SDK run"
        )

        def summary(runs: list[tuple[float, list[float]]]) -> tuple[float, float, float, str]:
            rates = [r for r, _ in runs]
            lat = [x for _, values in runs for x in values]
            spread = " ".join(f"{r:.1f}" for r in rates)
            return statistics.median(rates), statistics.median(lat), pct(lat, 0.95), spread

        sdk_rate, sdk_p50, sdk_p95, sdk_spread = summary(results["sdk"])
        print(
            f"  bare SDK loop sign->verify->settle (sequential): {sdk_rate:6.1f}/s  "
            f"p50 {sdk_p50:5.0f} ms  p95 {sdk_p95:5.0f} ms   runs: {sdk_spread}"
        )
        for workers in ("1", "2"):
            rate, p50, p95, spread = summary(results[workers])
            print(
                f"  our send, {workers} worker(s) x 8 threads:            {rate:6.1f}/s  "
                f"p50 {p50:5.0f} ms  p95 {p95:5.0f} ms  ({rate / sdk_rate:.2f}x SDK loop)   "
                f"runs: {spread}"
            )
        print("  (latency of ours = job queued -> finished, so it includes queueing of the batch)")
    finally:
        for p in procs:
            p.kill()
        fac.terminate()
        node.stop()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
