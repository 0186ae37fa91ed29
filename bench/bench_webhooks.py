"""Webhook throughput and latency on PostgreSQL with two dispatcher processes.

The events are real payment events (``payment.created`` -> ``authorized`` -> ``settling`` ->
``settled``, written by the payment state machine), so every delivery goes through the ordering
rule: a payment's events reach the subscriber in sequence order. The receiver checks that order.

Phase 1 (throughput): a backlog of payments is written in one transaction while two warm
dispatcher processes poll; deliveries/s = deliveries / (last arrival - commit).
Phase 2 (latency): payments move one step per transaction at a steady rate (~50 events/s) while
the dispatchers poll; event -> delivery latency = arrival at the receiver - commit (p50, p95).
Targets (issue 13): >= 500 deliveries/s and p50 < 200 ms.

Isolation: a throwaway PostgreSQL database, created and dropped here; no Redis (the dispatchers
are driven directly, the way a worker's dispatch task runs them). ``--smoke`` runs tiny sizes so
the test suite can prove the bench still works (it asserts completion, never a speed).
Results go to ``bench/results/bench_webhooks.json`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, Request, Response

from api.stack import ServerThread, free_port
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.ids import new_id
from connector.payments.machine import Step, advance, insert_payment
from connector.payments.states import PaymentState as S
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.storage.db import make_engine, transaction
from connector.storage.models.payments import Payment
from connector.vault import MasterKeyRing
from connector.webhooks import dispatcher

ADMIN_DSN = os.environ.get("X402C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "bench_webhooks.json"
STEPS = (S.AUTHORIZED, S.SETTLING, S.SETTLED)  # after created: four events per payment
TARGET_RATE, TARGET_P50_MS = 500.0, 200.0


def settings_for(url: str, keys: str, data_dir: str) -> Settings:
    return Settings(
        database_url=url, master_keys=keys, data_dir=Path(data_dir), webhook_allow_loopback=True
    )


def dispatcher_loop(url: str, keys: str, data_dir: str, ready: Any, stop: Any) -> None:
    rt = Runtime.from_settings(settings_for(url, keys, data_dir))
    dispatcher.dispatch(rt)  # connections and statements warm before the clock starts
    ready.set()
    while not stop.is_set():
        if dispatcher.dispatch(rt) == 0:
            time.sleep(0.01)


class Receiver:
    """Records the first arrival of each (payment, sequence) and every order violation."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[str, int], float] = {}
        self.acked: dict[str, int] = {}  # payment -> highest sequence acknowledged in order
        self.violations = 0
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            event = json.loads(await request.body())
            payment_id, seq = event["data"]["payment"]["id"], event["sequence"]
            now = time.time()
            with self.lock:
                self.arrivals.setdefault((payment_id, seq), now)
                if seq > self.acked.get(payment_id, 0) + 1:
                    self.violations += 1  # an earlier event of this payment has not arrived
                self.acked[payment_id] = max(self.acked.get(payment_id, 0), seq)
            return Response(status_code=204)

        return app

    def wait_for(self, keys: list[tuple[str, int]], timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if all(k in self.arrivals for k in keys):
                    return True
            time.sleep(0.005)
        return False


def new_payment(conn_id: str) -> Payment:
    return Payment(
        id=new_id("pay"), connection_id=conn_id, direction="incoming", state="created",
        amount=10_000, asset="0x" + "1" * 40, network="eip155:8453", payee="0x" + "2" * 40,
    )  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * q) - 1)]


def run(payments: int, latency_events: int, dispatchers: int) -> dict[str, Any]:
    name = "x402c_bench_wh_" + secrets.token_hex(4)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    keys = MasterKeyRing.generate_spec("b1")
    data_dir = tempfile.mkdtemp(prefix="x402c-bench-wh-")
    receiver = Receiver()
    server = ServerThread(receiver.app(), free_port()).start()
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(dispatchers)]
    stop = ctx.Event()
    procs: list[Any] = []
    rt = Runtime(settings=settings_for(url, keys, data_dir), engine=make_engine(url))
    try:
        migrate.upgrade(rt.engine)
        with transaction(rt.engine) as s:
            conn_id = connections.create(
                s, rt.vault,
                ConnectionCreate(name="bench", network="base", rpc_url="https://r.example",
                                 facilitator_url="https://f.example",
                                 webhook_url=server.url + "/hook"),
            ).id  # fmt: skip
        procs = [
            ctx.Process(target=dispatcher_loop, args=(url, keys, data_dir, ready[i], stop))
            for i in range(dispatchers)
        ]
        for p in procs:
            p.start()
        for event in ready:
            if not event.wait(120):
                raise RuntimeError("a dispatcher did not start")

        # Phase 1: a backlog, each payment with all four events, committed at once.
        with transaction(rt.engine) as s:
            backlog = [
                insert_payment(s, new_payment(conn_id), then=[Step(t) for t in STEPS]).id
                for _ in range(payments)
            ]
        start = time.time()
        keys_1 = [(pid, seq) for pid in backlog for seq in range(1, len(STEPS) + 2)]
        if not receiver.wait_for(keys_1, 300):
            raise RuntimeError("throughput phase: not every event arrived within 300 s")
        elapsed = max(receiver.arrivals[k] for k in keys_1) - start
        rate = len(keys_1) / elapsed

        # Phase 2: payments move one step per transaction, ~50 events/s, interleaved.
        in_flight = [new_payment(conn_id) for _ in range(max(1, latency_events // 4))]
        step_of = dict.fromkeys((p.id for p in in_flight), 0)
        committed: dict[tuple[str, int], float] = {}
        for i in range(latency_events):
            payment = in_flight[i % len(in_flight)]
            step = step_of[payment.id]
            if step > len(STEPS):
                continue
            with transaction(rt.engine) as s:
                if step == 0:
                    insert_payment(s, payment)
                else:
                    stored = s.get(Payment, payment.id)
                    assert stored is not None
                    advance(s, stored, [Step(STEPS[step - 1])])
            committed[(payment.id, step + 1)] = time.time()
            step_of[payment.id] = step + 1
            time.sleep(0.02)
        receiver.wait_for(list(committed), 60)
        arrived = receiver.arrivals
        latencies = [(arrived[k] - t) * 1000 for k, t in committed.items() if k in arrived]
        return {
            "deliveries": len(keys_1),
            "elapsed_s": elapsed,
            "rate": rate,
            "latency_events": len(committed),
            "latency_delivered": len(latencies),
            "p50_ms": statistics.median(latencies),
            "p95_ms": pct(latencies, 0.95),
            "violations": receiver.violations,
            "dispatchers": dispatchers,
        }
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
        server.stop()
        rt.engine.dispose()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_results(result: dict[str, Any], out: Path) -> None:
    n = result["dispatchers"]
    rows = [
        {
            "what": f"webhook deliveries/s, payment events in order, {n} dispatchers, PostgreSQL",
            "ours": f"{result['rate']:,.0f}/s",
            "baseline": f"target {TARGET_RATE:.0f}/s",
            "ratio": round(result["rate"] / TARGET_RATE, 2),
        },
        {
            "what": "event -> delivery p50 at ~50 events/s (ratio: target / ours)",
            "ours": f"p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms",
            "baseline": f"target p50 < {TARGET_P50_MS:.0f} ms",
            "ratio": round(TARGET_P50_MS / max(result["p50_ms"], 0.001), 2),
        },
        {
            "what": "deliveries out of sequence order",
            "ours": str(result["violations"]),
            "baseline": "0",
            "ratio": None,
        },
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "bench_webhooks",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the bench runs")
    parser.add_argument("--payments", type=int, default=int(os.environ.get("BENCH_N", "500")))
    parser.add_argument(
        "--latency-events", type=int, default=int(os.environ.get("BENCH_LATENCY_EVENTS", "400"))
    )
    parser.add_argument("--dispatchers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.payments, args.latency_events, args.dispatchers = 10, 16, 1
    result = run(args.payments, args.latency_events, args.dispatchers)
    n = result["dispatchers"]
    print(f"webhooks on PostgreSQL, {n} dispatcher processes, receiver on loopback")
    print(
        f"  throughput: {result['deliveries']} deliveries in {result['elapsed_s']:.2f}s"
        f" = {result['rate']:,.0f} deliveries/s (target >= {TARGET_RATE:.0f})"
    )
    print(
        f"  latency event->delivery over {result['latency_delivered']}/{result['latency_events']}"
        f" events at ~50/s: p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms"
        f" (target p50 < {TARGET_P50_MS:.0f})"
    )
    print(f"  deliveries out of sequence order: {result['violations']}")
    write_results(result, args.out)
    print(f"  results: {args.out}")


if __name__ == "__main__":
    main()
