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

Where the CPU goes: every run reads the CPU time of each process involved from ``/proc`` before
and after (workers, facilitator, anvil, this database's PostgreSQL backends, Redis, this process)
and prints it per payment, next to how busy the whole machine was (other load shows there).

A run that stops making progress fails loudly instead of waiting forever: after
``BENCH_STALL_S`` seconds (default 60) without a job finishing it prints the jobs' status counts,
what the broker still holds and the tail of each worker's log (workers log to files in a
temporary folder, kept when a run fails). ``BENCH_CONFIGS`` (default ``0,1,2``) picks the
configurations: 0 is the SDK loop, 1 and 2 the number of workers.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis
from eth_account.signers.local import LocalAccount
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
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
from workers.wiring import celery_dispatch

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
STALL_S = float(os.environ.get("BENCH_STALL_S", "60"))
CONFIGS = tuple(int(c) for c in os.environ.get("BENCH_CONFIGS", "0,1,2").split(","))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
THREADS = os.environ.get("BENCH_THREADS", "8")  # threads per worker (the target says 8)
#: Payments each side makes before its clock starts (``--smoke``: 2).
WARMUP = int(os.environ.get("BENCH_WARMUP", "2" if SMOKE else "16"))
TIMELINE = bool(os.environ.get("BENCH_TIMELINE"))  # print jobs finished per 250 ms
Run = tuple[float, list[float], dict[str, float]]  # (payments/s, latencies in ms, CPU ms/payment)


class Stalled(SystemExit):
    """A run stopped making progress (see ``BENCH_STALL_S``)."""


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, fields start at #3
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process, ours or not)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds per named group of processes between :meth:`start` and :meth:`stop`.

    PostgreSQL serves each connection from its own backend process: the group ``postgres`` is the
    backends connected to the bench's database (found at both ends; one that exits meanwhile is
    missed, one that starts meanwhile counts whole).
    """

    def __init__(self, db: str, redis_pid: int | None) -> None:
        self.db = db
        self.redis_pid = redis_pid
        self.groups: dict[str, list[int]] = {}

    def _backends(self) -> list[int]:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.db,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def _sample(self) -> dict[tuple[str, int], float]:
        groups = {**self.groups, "postgres": self._backends(), "bench": [os.getpid()]}
        if self.redis_pid:
            groups["redis"] = [self.redis_pid]
        out = {}
        for name, pids in groups.items():
            for pid in pids:
                cpu = proc_cpu_s(pid)
                if cpu is not None:
                    out[(name, pid)] = cpu
        return out

    def start(self, **groups: list[int]) -> None:
        self.groups = groups
        self._before = self._sample()
        self._busy = machine_busy_s()
        self._t0 = time.perf_counter()

    def stop(self, payments: int) -> dict[str, float]:
        """CPU milliseconds per payment for each group, ``all ours`` and ``machine``."""
        after = self._sample()
        busy = machine_busy_s() - self._busy
        wall = time.perf_counter() - self._t0
        per: dict[str, float] = {}
        for (name, pid), cpu in after.items():
            per[name] = per.get(name, 0.0) + cpu - self._before.get((name, pid), 0.0)
        result = {name: 1000 * v / payments for name, v in sorted(per.items())}
        result["all ours"] = sum(result.values())
        result["machine"] = 1000 * busy / payments
        result["machine busy %"] = 100 * busy / (wall * (os.cpu_count() or 1))
        return result


CPU_GROUPS = ("workers", "facilitator", "anvil", "postgres", "redis", "bench")


def median_cpu(runs: list[Run]) -> dict[str, float]:
    keys = {k for _, _, cpu in runs for k in cpu}
    return {k: statistics.median(cpu.get(k, 0.0) for _, _, cpu in runs) for k in keys}


def cpu_line(cpu: dict[str, float]) -> str:
    parts = [f"{k} {cpu[k]:.1f}" for k in CPU_GROUPS if k in cpu]
    return (
        "CPU ms/payment: " + ", ".join(parts) + f"; all ours {cpu['all ours']:.1f}, machine "
        f"{cpu['machine']:.1f} ({cpu['machine busy %']:.0f}% busy)"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


@dataclass
class Chain:
    info: DevChainInfo
    facilitator_url: str
    accounts: list[LocalAccount]
    facilitator_pid: int
    anvil_pid: int


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
        assert node._proc is not None
        yield Chain(info, url, dev_accounts(20), fac.pid, node._proc.pid)
    finally:
        fac.terminate()
        fac.wait(timeout=20)
        node.stop()


def sdk_loop(chain: Chain, meter: CpuMeter) -> Run:
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

    def pay() -> None:
        payload = sdk.create_payment_payload(offer)
        assert facilitator.verify(payload, offer.accepts[0]).is_valid
        assert facilitator.settle(payload, offer.accepts[0]).success

    for _ in range(WARMUP):  # as many as ours gets, outside the clock
        pay()
    lat = []
    meter.start(facilitator=[chain.facilitator_pid], anvil=[chain.anvil_pid])
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        pay()
        lat.append((time.perf_counter() - t0) * 1000)
    rate = count / (time.perf_counter() - start)
    return rate, lat, meter.stop(count)


def our_send(rt: Runtime, env: dict[str, str], chain: Chain, workers: int, meter: CpuMeter) -> Run:
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
    logs = Path(tempfile.mkdtemp(prefix="bench_send_logs_"))
    procs = []
    for i in range(workers):
        with open(logs / f"worker{i}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "api.cli", "worker", "--concurrency", THREADS],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    failed = True
    try:
        # Measure from the moment every worker answers a ping (start-up is not throughput).
        for _ in range(300):
            if len(app.control.ping(timeout=0.5) or []) >= workers:
                break
        else:
            raise SystemExit(f"workers did not come up; their logs: {logs}")
        enqueue = celery_dispatch(app)  # what the API does after committing a job
        finished = col(Job.status).in_(("succeeded", "failed"))

        def queue_batch(count: int, tag: str) -> tuple[datetime, float]:
            """``count`` jobs created in one transaction, then queued at once."""
            created_from = datetime.now(UTC)
            with transaction(rt.engine) as s:
                ids = [
                    start_job(
                        s,
                        connection_id=conn_id,
                        action="send",
                        body={"to": chain.accounts[19].address, "amount": "1"},
                        idempotency_key=f"bench-{tag}-{i}",  # money moves: a key is required
                    ).job.id
                    for i in range(count)
                ]
            created_s = (datetime.now(UTC) - created_from).total_seconds()
            for job_id in ids:
                enqueue("x402c.run_job", (job_id,))
            return created_from, created_s

        def wait_for(count: int, since: datetime) -> None:
            """Poll cheaply (a COUNT every 100 ms) so the measuring process does not steal the
            CPU the workers need on a 2-core machine; fail loudly when nothing moves."""
            mine = (col(Job.connection_id) == conn_id, col(Job.created_at) >= since)
            last_done, last_progress = -1, time.monotonic()
            while True:
                try:
                    with transaction(rt.engine) as s:
                        done = s.execute(select(func.count()).where(*mine, finished)).scalar_one()
                except OperationalError:  # the database is away: no progress seen, keep waiting
                    done = last_done
                if done >= count:
                    return
                if done != last_done:
                    last_done, last_progress = done, time.monotonic()
                elif time.monotonic() - last_progress > STALL_S:
                    raise Stalled(stall_report(rt, conn_id, workers, logs, procs, STALL_S))
                time.sleep(0.1)

        # Long-running workers are warm: the first jobs of a new process pay for its caches
        # (statement compilation, the chain client, the token's EIP-712 domain, the
        # facilitator's first settle). The SDK loop gets as many payments outside its clock.
        if WARMUP:
            wait_for(WARMUP, queue_batch(WARMUP, f"warm-{secrets.token_hex(4)}")[0])
        print(
            f"measuring {workers} worker(s): pids {' '.join(str(p.pid) for p in procs)}, "
            f"facilitator {chain.facilitator_pid}, anvil {chain.anvil_pid}",
            file=sys.stderr,
            flush=True,
        )
        meter.start(
            workers=[p.pid for p in procs],
            facilitator=[chain.facilitator_pid],
            anvil=[chain.anvil_pid],
        )
        started_at, created_s = queue_batch(N, secrets.token_hex(6))
        if TIMELINE:
            queued_s = (datetime.now(UTC) - started_at).total_seconds()
            print(f"jobs created at {created_s:.3f} s, queued at {queued_s:.3f} s", file=sys.stderr)
        wait_for(N, started_at)
        cpu = meter.stop(N)
        with transaction(rt.engine) as s:
            jobs = list(
                s.execute(
                    select(Job).where(
                        col(Job.connection_id) == conn_id, col(Job.created_at) >= started_at
                    )
                ).scalars()
            )
        assert len(jobs) == N, len(jobs)
        assert all(j.status == "succeeded" for j in jobs), {j.status for j in jobs}
        # The run ends when the last job finished (its own timestamp, same clock), not at the
        # poll that noticed it: polling every 100 ms would add ~50 ms to a ~2 s run.
        elapsed = (max(j.updated_at for j in jobs) - started_at).total_seconds()
        lat = [(j.updated_at - j.created_at).total_seconds() * 1000 for j in jobs]
        if TIMELINE:
            print(timeline(started_at, [j.updated_at for j in jobs]), file=sys.stderr)
        failed = False
        return N / elapsed, lat, cpu
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        app.close()  # the producer's pooled broker connections
        if failed or os.environ.get("BENCH_KEEP_LOGS"):
            print(f"worker logs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)


def timeline(started_at: datetime, finished: list[datetime], step_s: float = 0.25) -> str:
    """Jobs finished in each ``step_s`` from the start: shows a slow start or a long tail."""
    counts: dict[int, int] = {}
    for when in finished:
        slot = int((when - started_at).total_seconds() / step_s)
        counts[slot] = counts.get(slot, 0) + 1
    return f"finished per {step_s:g} s: " + " ".join(
        str(counts.get(i, 0)) for i in range(max(counts) + 1)
    )


def stall_report(
    rt: Runtime,
    conn_id: str,
    workers: int,
    logs: Path,
    procs: list[subprocess.Popen[bytes]],
    stall_s: float,
) -> str:
    """What a stuck run looks like: job statuses, the broker's queues and the workers' logs."""
    try:
        return _stall_report(rt, conn_id, workers, logs, procs, stall_s)
    except OperationalError as exc:
        return (
            f"no job finished for {stall_s:g} s and the database is unreachable "
            f"({type(exc).__name__}); worker logs: {logs}"
        )


def _stall_report(
    rt: Runtime,
    conn_id: str,
    workers: int,
    logs: Path,
    procs: list[subprocess.Popen[bytes]],
    stall_s: float,
) -> str:
    with transaction(rt.engine) as s:
        rows = s.execute(
            select(col(Job.status), col(Job.attempts), col(Job.error)).where(
                col(Job.connection_id) == conn_id
            )
        ).all()
    tally: dict[tuple[str, int, str], int] = {}
    for status, attempts, error in rows:
        key = (status, attempts, (error or {}).get("code") or "-")
        tally[key] = tally.get(key, 0) + 1
    broker = redis.Redis.from_url(BROKER)
    queued = broker.llen("celery")
    unacked = broker.hlen("unacked")
    lines = [
        f"no job finished for {stall_s:g} s ({workers} worker(s)); job status (attempts, error): "
        + ", ".join(f"{st} ({at}, {code}): {n}" for (st, at, code), n in sorted(tally.items())),
        f"broker: {queued} message(s) queued, {unacked} unacknowledged, {broker.dbsize()} key(s)",
        "workers alive: " + ", ".join(str(p.poll() is None) for p in procs),
        f"worker logs: {logs}",
    ]
    for path in sorted(logs.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-40:]
        lines += [f"--- {path.name} (last {len(tail)} lines)", *tail]
    return "\n".join(lines)


def summary(runs: list[Run]) -> tuple[float, float, float, str]:
    rates = [r for r, _, _ in runs]
    lat = [x for _, values, _ in runs for x in values]
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
            "PYTHONUNBUFFERED": "1",  # worker logs reach their files as they are written
        }
        meter = CpuMeter(db, int(broker.info("server").get("process_id") or 0) or None)
        results: dict[int, list[Run]] = {c: [] for c in CONFIGS}
        for round_no in range(ROUNDS):
            for workers in CONFIGS:
                with fresh_chain() as chain:
                    run = (
                        sdk_loop(chain, meter)
                        if workers == 0
                        else our_send(rt, env, chain, workers, meter)
                    )
                results[workers].append(run)
                what = "SDK loop" if workers == 0 else f"ours, {workers} worker(s)"
                print(f"round {round_no + 1} {what}: {run[0]:.1f}/s; {cpu_line(run[2])}")
        print(
            f"send end to end, direct payments (Redis, PostgreSQL, anvil); {ROUNDS} interleaved "
            f"rounds, each run on a fresh chain; medians of runs; "
            f"{N} payments per run"
        )
        for workers in CONFIGS:
            rate, p50, p95, spread = summary(results[workers])
            cpu = median_cpu(results[workers])
            if workers == 0:
                label = "bare SDK loop sign->verify->settle (sequential):"
            else:
                label = f"our send, {workers} worker(s) x 8 threads:           "
            ratio = ""
            if workers and 0 in results:
                ratio = f"  ({rate / summary(results[0])[0]:.2f}x SDK loop)"
            print(
                f"  {label} {rate:6.1f}/s  p50 {p50:5.0f} ms  p95 {p95:5.0f} ms{ratio}   "
                f"runs: {spread}\n      median {cpu_line(cpu)}"
            )
        print("  (latency of ours = job queued -> finished, so it includes queueing of the batch)")
        if set(CONFIGS) != {0, 1, 2}:
            return  # a partial run (profiling) records nothing
        sdk_rate = summary(results[0])[0]
        rows = [
            record.row(
                f"`send` end to end, {workers} worker(s) x 8 threads (Redis, PostgreSQL)",
                f"{summary(results[workers])[0]:.1f}/s",
                f"bare SDK loop sign->verify->settle {sdk_rate:.1f}/s",
                summary(results[workers])[0] / sdk_rate,
            )
            for workers in (1, 2)
        ]
        ours, sdk = median_cpu(results[2]), median_cpu(results[0])
        rows.append(
            record.row(
                "`send` CPU per payment, 2 workers, all processes (ms; machine-wide in brackets)",
                f"{ours['all ours']:.1f} ms ({ours['machine']:.1f}): "
                + ", ".join(f"{k} {ours[k]:.1f}" for k in CPU_GROUPS if k in ours),
                f"SDK loop {sdk['all ours']:.1f} ms ({sdk['machine']:.1f})",
                None,
            )
        )
        record.write("send", rows, smoke=SMOKE)
    finally:
        for pattern in OWN_KEY_PATTERNS:  # the database was empty: these keys are this run's
            for key in broker.scan_iter(match=pattern, count=500):
                broker.delete(key)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
