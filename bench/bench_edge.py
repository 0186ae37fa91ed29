"""The API edge under load and during a broker outage (not a test; prints and writes results).

Runs ``x402c serve`` as a child process on PostgreSQL with a Redis broker, then measures:

1. action submissions/s (``receive``, answered 202 with a queued job) at concurrency 16, against
   the same submissions one at a time (baseline): the route must not serialize on the event loop;
2. ``/healthz`` latency (p50/p95, sequential) with the broker up (baseline), then with the broker
   pointed at a closed loopback port while submissions keep arriving at concurrency 16.

Jobs are published to a queue no worker reads (a random name), deleted at the end. The shared
Redis is never stopped: the outage is a broker URL with nothing listening.

    .venv/bin/python bench/bench_edge.py          # BENCH_N=600 submissions per run
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from api.stack import free_port
from connector import admin_keys
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.vault import MasterKeyRing

ROOT = Path(__file__).resolve().parents[1]
ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
N = int(os.environ.get("BENCH_N", "600"))
CONCURRENCY = 16
QUEUE = "bench_edge_" + secrets.token_hex(4)

RUNNER = """
import os, sys
import uvicorn
from workers.celery_app import celery_app
from workers.runtime import runtime
from workers.wiring import wire
from api.app import create_app
from connector.settings import get_settings

rt = runtime()
wire(rt, celery_app)
queue = os.environ["BENCH_QUEUE"]
rt.dispatch = lambda task, args: celery_app.send_task(task, args=list(args), queue=queue)
app = create_app(get_settings(), runtime=rt)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def serve(
    db_url: str, keys: str, broker: str, data_dir: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "X402C_DATABASE_URL": db_url,
        "X402C_MASTER_KEYS": keys,
        "X402C_BROKER_URL": broker,
        "X402C_RESULT_BACKEND": "cache+memory://",
        "X402C_DATA_DIR": data_dir,
        "X402C_LOG_LEVEL": "WARNING",
        "X402C_OUTBOUND_ALLOW_LOOPBACK": "true",  # the connection points at 127.0.0.1:9
        "BENCH_QUEUE": QUEUE,
    }
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2)
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not start") from None
            time.sleep(0.1)


async def submit_many(url: str, key: str, connection_id: str, n: int, concurrency: int) -> float:
    """Submissions per second; every answer must be a 202."""
    headers = {"authorization": f"Bearer {key}"}
    path = f"/v1/connections/{connection_id}/actions/receive"
    todo = iter(range(n))
    bad: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        for _ in todo:
            response = await client.post(path, json={"amount": "1"}, headers=headers)
            if response.status_code != 202:
                bad.append(response.status_code)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if bad:
        raise RuntimeError(f"{len(bad)} submissions failed: {sorted(set(bad))}")
    return n / elapsed


async def healthz_latency(url: str, count: int, load: Any = None) -> tuple[float, float, str]:
    """p50/p95 in ms of sequential /healthz calls, optionally while ``load`` runs."""
    background = asyncio.ensure_future(load) if load is not None else None
    samples = []
    status = ""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await client.get("/healthz")
        for _ in range(count):
            start = time.perf_counter()
            response = await client.get("/healthz")
            samples.append((time.perf_counter() - start) * 1000)
            status = response.json()["status"] + "/" + response.json()["checks"]["broker"]["status"]
            await asyncio.sleep(0.01)
    if background is not None:
        await background
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1], status


def main() -> None:
    name = "x402c_bench_edge_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    db_url += "/" + name
    keys = MasterKeyRing.generate_spec("b1")
    data_dir = tempfile.mkdtemp()
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    with transaction(engine) as s:
        _, key = admin_keys.create_key(s, name="bench", scopes=["admin"])
    rows: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, url = serve(db_url, keys, REDIS_URL, data_dir)
        procs.append(proc)
        created = httpx.post(
            url + "/v1/admin/connections",
            headers={"authorization": f"Bearer {key}"},
            json={
                "name": "bench",
                "network": "base-sepolia",
                "rpc_url": "http://127.0.0.1:9/",
                "facilitator_url": "http://127.0.0.1:9/",
            },
        )
        created.raise_for_status()
        cid = created.json()["id"]
        asyncio.run(submit_many(url, key, cid, 50, 4))  # warm-up
        one = asyncio.run(submit_many(url, key, cid, N // 3, 1))
        many = asyncio.run(submit_many(url, key, cid, N, CONCURRENCY))
        print(
            f"submissions/s, broker up: {many:.0f} at {CONCURRENCY} concurrent, "
            f"{one:.0f} one at a time"
        )
        rows.append(
            {
                "what": f"action submissions/s, broker up ({CONCURRENCY} concurrent vs 1)",
                "ours": f"{many:.0f}/s",
                "baseline": f"{one:.0f}/s",
                "ratio": round(many / one, 2),
            }
        )
        up50, up95, up_status = asyncio.run(healthz_latency(url, 200))
        proc.terminate()
        proc.wait(30)

        closed = f"redis://127.0.0.1:{free_port()}/0"
        proc, url = serve(db_url, keys, closed, data_dir)
        procs.append(proc)
        start = time.perf_counter()
        down_load = submit_many(url, key, cid, N // 3, CONCURRENCY)
        down50, down95, down_status = asyncio.run(healthz_latency(url, 200, down_load))
        load_s = time.perf_counter() - start
        print(f"/healthz, broker up:   p50 {up50:.1f} ms, p95 {up95:.1f} ms ({up_status})")
        print(
            f"/healthz, broker down: p50 {down50:.1f} ms, p95 {down95:.1f} ms ({down_status}), "
            f"while {N // 3} submissions at {CONCURRENCY} concurrent took {load_s:.1f} s"
        )
        rows.append(
            {
                "what": "/healthz p50, broker unreachable + submissions vs broker up",
                "ours": f"{down50:.1f} ms",
                "baseline": f"{up50:.1f} ms",
                "ratio": round(down50 / up50, 2),
            }
        )
        rows.append(
            {
                "what": "/healthz p95, broker unreachable + submissions vs broker up",
                "ours": f"{down95:.1f} ms",
                "baseline": f"{up95:.1f} ms",
                "ratio": round(down95 / up95, 2),
            }
        )
        rows.append(
            {
                "what": "/healthz status reported, broker unreachable",
                "ours": down_status,
                "baseline": up_status,
                "ratio": None,
            }
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        engine.dispose()
        redis.Redis.from_url(REDIS_URL).delete(QUEUE)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    out = ROOT / "bench" / "results" / "bench_edge.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"bench": "bench_edge", "measured_at": datetime.now(UTC).isoformat(), "rows": rows},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
