"""Measure the first webhook retry delays as a receiver sees them (for docs/webhooks.md).

Runs the embedded worker (what ``x402c dev`` runs: the same dispatch task, the same 5 s sweep as
``x402c beat``) on a throwaway SQLite file, against a loopback receiver that answers 503 to the
first ``FAILS`` attempts of each event and 204 after. Prints, per gap, the min/median/max over
the events: commit -> first attempt, first -> second (scheduled 5 s), second -> third (5 min).
Takes about six minutes with the defaults; real time, no simulated clock.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request, Response

from api.stack import ServerThread, free_port
from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.events.outbox import record_event
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage import migrate
from connector.vault import MasterKeyRing

EVENTS = int(os.environ.get("BENCH_EVENTS", "5"))
FAILS = int(os.environ.get("BENCH_FAILS", "2"))


def main() -> None:
    from connector.storage.db import transaction
    from workers.embedded import embedded_worker

    arrivals: dict[str, list[float]] = {}
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        event_id = request.headers["webhook-id"]
        with lock:
            seen = arrivals.setdefault(event_id, [])
            seen.append(time.time())
            status = 503 if len(seen) <= FAILS else 204
        return Response(status_code=status)

    server = ServerThread(app, free_port()).start()
    data_dir = Path(tempfile.mkdtemp(prefix="x402c-retry-"))
    settings = Settings(
        data_dir=data_dir,
        master_keys=MasterKeyRing.generate_spec("r1"),
        webhook_allow_loopback=True,
    )
    rt = Runtime.from_settings(settings)
    migrate.upgrade(rt.engine)
    with transaction(rt.engine) as s:
        conn_id = connections.create(
            s, rt.vault,
            ConnectionCreate(name="retry", network="base", rpc_url="https://r.example",
                             facilitator_url="https://f.example",
                             webhook_url=server.url + "/hook"),
        ).id  # fmt: skip
    committed: dict[str, float] = {}
    try:
        with embedded_worker(rt):
            for i in range(EVENTS):
                with transaction(rt.engine) as s:
                    event_id = record_event(s, "webhook.test", conn_id, {"i": i})["id"]
                committed[event_id] = time.time()
                time.sleep(1.3)  # spread the events over the sweep's 5 s period
            deadline = time.time() + 420 + 60 * FAILS
            while time.time() < deadline:
                with lock:
                    if all(len(arrivals.get(e, [])) > FAILS for e in committed):
                        break
                time.sleep(0.5)
    finally:
        server.stop()
    gaps: list[list[float]] = [[] for _ in range(FAILS + 1)]
    for event_id, t0 in committed.items():
        times = [t0, *arrivals.get(event_id, [])]
        for n in range(min(FAILS + 1, len(times) - 1)):
            gaps[n].append(times[n + 1] - times[n])
    names = ["commit -> attempt 1", *[f"attempt {n} -> {n + 1}" for n in range(1, FAILS + 1)]]
    print(f"webhook retry delays, embedded worker (5 s sweep), {EVENTS} events, real time")
    for name, values in zip(names, gaps, strict=True):
        if values:
            print(
                f"  {name:<20} min {min(values):8.2f} s  median {statistics.median(values):8.2f} s"
                f"  max {max(values):8.2f} s  (n={len(values)})"
            )


if __name__ == "__main__":
    main()
