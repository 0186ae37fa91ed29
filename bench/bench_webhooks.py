"""Webhook throughput and latency on PostgreSQL with two dispatcher processes.

Phase 1 (throughput): N events are written, two dispatcher processes deliver them to a local
receiver; deliveries/s = N / time until the receiver has them all.
Phase 2 (latency): events are written one by one at a steady rate while the dispatchers poll;
event→delivery latency = receiver arrival time − event commit time (p50, p95).
Targets: >= 500 deliveries/s, p50 < 200 ms.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from fastapi import FastAPI, Request, Response

from api.stack import ServerThread, free_port
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.events.outbox import record_event
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.vault import MasterKeyRing
from connector.webhooks import dispatcher

ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
N = int(os.environ.get("BENCH_N", "2000"))
LATENCY_EVENTS = int(os.environ.get("BENCH_LATENCY_EVENTS", "200"))


def settings_for(url: str, keys: str, data_dir: str) -> Settings:
    return Settings(
        database_url=url, master_keys=keys, data_dir=Path(data_dir), webhook_allow_loopback=True
    )


def dispatcher_loop(url: str, keys: str, data_dir: str, stop_at: float) -> None:
    rt = Runtime.from_settings(settings_for(url, keys, data_dir))
    while time.time() < stop_at:
        if dispatcher.dispatch(rt) == 0:
            time.sleep(0.01)


def main() -> None:
    name = "x402c_bench_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    keys = MasterKeyRing.generate_spec("b1")
    data_dir = tempfile.mkdtemp()
    arrivals: dict[str, float] = {}
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        event_id = request.headers["webhook-id"]
        with lock:
            arrivals.setdefault(event_id, time.time())
        return Response(status_code=204)

    server = ServerThread(app, free_port()).start()
    try:
        rt = Runtime(settings=settings_for(url, keys, data_dir), engine=make_engine(url))
        migrate.upgrade(rt.engine)
        with transaction(rt.engine) as s:
            conn_id = connections.create(
                s, rt.vault,
                ConnectionCreate(name="bench", network="base", rpc_url="https://r.example",
                                 facilitator_url="https://f.example",
                                 webhook_url=server.url + "/hook"),
            ).id  # fmt: skip

        # Phase 1: throughput on a backlog (dispatchers are started and warm first).
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=dispatcher_loop, args=(url, keys, data_dir, time.time() + 180))
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        time.sleep(5)
        with transaction(rt.engine) as s:
            ids = [record_event(s, "webhook.test", conn_id, {"i": i})["id"] for i in range(N)]
        start = time.time()
        while time.time() - start < 120:
            with lock:
                if all(i in arrivals for i in ids):
                    break
            time.sleep(0.01)
        elapsed = max(arrivals[i] for i in ids) - start
        rate = N / elapsed

        # Phase 2: steady-state latency.
        created: dict[str, float] = {}
        for i in range(LATENCY_EVENTS):
            with transaction(rt.engine) as s:
                event = record_event(s, "webhook.test", conn_id, {"lat": i})
            created[event["id"]] = time.time()
            time.sleep(0.02)
        deadline = time.time() + 30
        while time.time() < deadline:
            with lock:
                if all(i in arrivals for i in created):
                    break
            time.sleep(0.01)
        for p in procs:
            p.terminate()
            p.join()
        latencies = sorted((arrivals[i] - t) * 1000 for i, t in created.items() if i in arrivals)
        p50 = statistics.median(latencies)
        p95 = latencies[int(len(latencies) * 0.95) - 1]
        print("webhooks on PostgreSQL, 2 dispatcher processes, receiver on loopback")
        print(
            f"  throughput: {N} deliveries in {elapsed:.2f}s = {rate:,.0f} deliveries/s"
            " (target >= 500)"
        )
        print(
            f"  latency event->delivery over {len(latencies)} events at ~50/s: "
            f"p50 {p50:.0f} ms, p95 {p95:.0f} ms (target p50 < 200)"
        )
    finally:
        server.stop()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
