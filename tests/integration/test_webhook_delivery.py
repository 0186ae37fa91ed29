"""Outbox -> dispatcher -> signed HTTP to real receivers on loopback, on SQLite and PostgreSQL.

The clock is simulated (``now=`` everywhere) so the whole three-day retry schedule runs at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from sqlalchemy.engine import Engine
from standardwebhooks.webhooks import Webhook

from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.events.outbox import record_event
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import transaction
from connector.storage.models.events import Delivery, DeliveryAttempt, Event, Subscription
from connector.vault import MasterKeyRing
from connector.webhooks import dispatcher
from connector.webhooks.delivery import MAX_ATTEMPTS
from tests.fixtures.servers import LiveServer, free_port


@dataclass
class Receiver:
    secret: str = ""
    status: int = 204
    retry_after: str | None = None
    check_signatures: bool = True  # off when the test's clock runs days ahead of real time
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            try:
                if self.check_signatures:
                    event = Webhook(self.secret).verify(body, dict(request.headers))
                else:
                    event = json.loads(body)
            except Exception:
                with self.lock:
                    self.bad_signatures += 1
                return Response(status_code=400)
            with self.lock:
                self.received.append({**event, "_webhook_id": request.headers["webhook-id"]})
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return Response(status_code=self.status, headers=headers)

        return app

    def unique_ids(self) -> set[str]:
        return {e["id"] for e in self.received}


@pytest.fixture
def rt(engine: Engine, tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=tmp_path,
        master_keys=MasterKeyRing.generate_spec("w1"),
        webhook_allow_loopback=True,
        webhook_timeout_s=2,
        webhook_disable_after_days=5,
    )
    yield Runtime(settings=settings, engine=engine)


def make_connection(rt: Runtime, url: str) -> tuple[str, str]:
    with transaction(rt.engine) as s:
        created = connections.create(
            s,
            rt.vault,
            ConnectionCreate(
                name="hooks", network="base-sepolia", rpc_url="https://r.example",
                facilitator_url="https://f.example", webhook_url=url,
            ),
        )  # fmt: skip
    assert created.webhook_secret_once is not None
    return created.id, created.webhook_secret_once


def emit(rt: Runtime, conn_id: str, n: int) -> list[str]:
    ids = []
    with transaction(rt.engine) as s:
        for i in range(n):
            ids.append(record_event(s, "webhook.test", conn_id, {"n": i})["id"])
    return ids


def deliveries(rt: Runtime) -> list[Delivery]:
    with transaction(rt.engine) as s:
        return list(s.execute(select(Delivery).order_by(Delivery.id)).scalars())


def test_receiver_down_then_up_gets_every_event_once_after_dedup(rt: Runtime) -> None:
    port = free_port()
    conn_id, secret = make_connection(rt, f"http://127.0.0.1:{port}/hook")
    ids = emit(rt, conn_id, 5)
    now = datetime.now(UTC)
    assert dispatcher.dispatch(rt, now=now) == 5  # receiver down: all fail, retry scheduled
    rows = deliveries(rt)
    assert {d.status for d in rows} == {"pending"} and {d.attempts for d in rows} == {1}
    receiver = Receiver(secret=secret)
    with LiveServer(receiver.app(), port=port):
        later = now + timedelta(seconds=10)
        dispatcher.dispatch(rt, now=later)
        # a redelivery of everything: receivers see duplicates and de-duplicate by event id
        dispatcher.redeliver(rt, failed_since=now - timedelta(days=1), now=later)
        for d in deliveries(rt):
            dispatcher.redeliver(rt, delivery_id=d.id, now=later)
        dispatcher.dispatch(rt, now=later)
    assert receiver.unique_ids() == set(ids)
    assert all(e["_webhook_id"] == e["id"] for e in receiver.received)
    assert receiver.bad_signatures == 0
    with transaction(rt.engine) as s:
        attempts = s.execute(select(DeliveryAttempt)).scalars().all()
        assert {a.outcome for a in attempts} >= {"retry", "delivered"}
        assert all(a.latency_ms is not None for a in attempts)


def test_wake_up_run_delivers_new_events_and_leaves_due_retries_to_the_sweep(rt: Runtime) -> None:
    port = free_port()
    conn_id, secret = make_connection(rt, f"http://127.0.0.1:{port}/hook")
    first = emit(rt, conn_id, 2)
    now = datetime.now(UTC)
    assert dispatcher.dispatch(rt, now=now) == 2  # receiver down: both retry later
    receiver = Receiver(secret=secret)
    later = now + timedelta(seconds=10)  # the retries are due now
    with LiveServer(receiver.app(), port=port):
        silent = record_silent_event(rt)
        # A wake-up for an event nobody subscribed to: nothing new, so nothing is sent...
        assert dispatcher.dispatch(rt, now=later, new_only=True) == 0
        assert receiver.received == []
        with transaction(rt.engine) as s:
            assert s.get(Event, silent).dispatched  # ...but the event is routed all the same
        # A wake-up that fans out a new delivery sends it, and what else is due with it.
        new = emit(rt, conn_id, 1)
        assert dispatcher.dispatch(rt, now=later, new_only=True) == 3
    assert receiver.unique_ids() == set(first + new)


def record_silent_event(rt: Runtime) -> str:
    with transaction(rt.engine) as s:
        return str(record_event(s, "webhook.test", None, {"n": -1})["id"])


def test_whole_schedule_runs_to_dead_then_admin_redelivery_succeeds(rt: Runtime) -> None:
    receiver = Receiver(status=503, check_signatures=False)
    with LiveServer(receiver.app()) as server:
        conn_id, receiver.secret = make_connection(rt, server.url + "/hook")
        emit(rt, conn_id, 1)
        now = datetime.now(UTC)
        for _ in range(MAX_ATTEMPTS + 2):
            dispatcher.dispatch(rt, now=now)
            row = deliveries(rt)[0]
            if row.status == "dead":
                break
            assert row.next_attempt_at is not None
            now = row.next_attempt_at
        row = deliveries(rt)[0]
        assert row.status == "dead" and row.attempts == MAX_ATTEMPTS
        span = now - row.created_at
        assert timedelta(days=2.5) < span < timedelta(days=3.5)  # ~three days, with jitter
        receiver.status = 200
        assert dispatcher.redeliver(rt, delivery_id=row.id, now=now) == 1
        dispatcher.dispatch(rt, now=now)
    assert deliveries(rt)[0].status == "delivered"
    assert len(receiver.unique_ids()) == 1 and len(receiver.received) == MAX_ATTEMPTS + 1


def test_410_disables_the_endpoint_with_an_event(rt: Runtime) -> None:
    receiver = Receiver(status=410)
    with LiveServer(receiver.app()) as server:
        conn_id, receiver.secret = make_connection(rt, server.url + "/hook")
        emit(rt, conn_id, 2)
        dispatcher.dispatch(rt)
    with transaction(rt.engine) as s:
        sub = s.execute(select(Subscription).where(Subscription.is_default)).scalar_one()
        assert sub.status == "disabled" and "410" in (sub.disabled_reason or "")
        disabled = s.execute(select(Event).where(Event.type == "webhook.endpoint_disabled")).all()
        assert len(disabled) == 1
    assert {d.status for d in deliveries(rt)} == {"failed"}


def test_4xx_is_not_retried_but_429_is_with_retry_after(rt: Runtime) -> None:
    receiver = Receiver(status=400)
    with LiveServer(receiver.app()) as server:
        conn_id, receiver.secret = make_connection(rt, server.url + "/hook")
        emit(rt, conn_id, 1)
        now = datetime.now(UTC)
        dispatcher.dispatch(rt, now=now)
        assert deliveries(rt)[0].status == "failed"
        receiver.status, receiver.retry_after = 429, "7200"
        emit(rt, conn_id, 1)
        dispatcher.dispatch(rt, now=now)
    second = deliveries(rt)[1]
    assert second.status == "pending" and second.next_attempt_at is not None
    assert second.next_attempt_at - now >= timedelta(seconds=7200)


def test_a_crashed_dispatcher_loses_nothing(rt: Runtime) -> None:
    receiver = Receiver()
    with LiveServer(receiver.app()) as server:
        conn_id, receiver.secret = make_connection(rt, server.url + "/hook")
        ids = emit(rt, conn_id, 3)
        now = datetime.now(UTC)
        dispatcher.fan_out(rt, now=now)
        _, claimed = dispatcher._claim(rt, now, 10)  # a worker claims ... and dies before sending
        assert sum(len(chain) for chain in claimed) == 3
        assert dispatcher.deliver_due(rt, now=now) == 0  # leases held: nobody double-sends
        dispatcher.deliver_due(rt, now=now + dispatcher.LEASE + timedelta(seconds=1))
    assert receiver.unique_ids() == set(ids)
    assert len(receiver.received) == 3


@pytest.mark.parametrize(
    "target", ["http://10.1.2.3/hook", "http://[fc00::1]/hook", "http://169.254.169.254/x"]
)
def test_private_webhook_targets_are_refused_before_connecting(rt: Runtime, target: str) -> None:
    conn_id, _ = make_connection(rt, target)
    emit(rt, conn_id, 1)
    dispatcher.dispatch(rt)
    row = deliveries(rt)[0]
    assert row.status == "failed" and "UnsafeURL" in (row.last_error or "")


def test_loopback_is_refused_unless_allowed(engine: Engine, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, master_keys=MasterKeyRing.generate_spec("w2"))
    strict = Runtime(settings=settings, engine=engine)
    receiver = Receiver()
    with LiveServer(receiver.app()) as server:
        conn_id, receiver.secret = make_connection(strict, server.url + "/hook")
        emit(strict, conn_id, 1)
        dispatcher.dispatch(strict)
    assert receiver.received == []
    assert "loopback" in (deliveries(strict)[0].last_error or "")


def test_endpoint_failing_for_days_is_disabled_with_a_visible_reason(
    engine: Engine, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        master_keys=MasterKeyRing.generate_spec("w3"),
        webhook_allow_loopback=True,
        webhook_disable_after_days=1,
    )
    rt = Runtime(settings=settings, engine=engine)
    receiver = Receiver(status=500, check_signatures=False)
    with LiveServer(receiver.app()) as server:
        conn_id, _ = make_connection(rt, server.url + "/hook")
        emit(rt, conn_id, 1)
        start = now = datetime.now(UTC)
        dispatcher.dispatch(rt, now=now)
        while deliveries(rt)[0].status == "pending" and now - start < timedelta(days=3):
            now = deliveries(rt)[0].next_attempt_at or now
            dispatcher.dispatch(rt, now=now)
    with transaction(rt.engine) as s:
        sub = s.execute(select(Subscription).where(Subscription.is_default)).scalar_one()
        assert sub.status == "disabled"
        assert "failing continuously since" in (sub.disabled_reason or "")
        assert timedelta(days=1) <= sub.updated_at - start < timedelta(days=2)
        types = [e.type for e in s.execute(select(Event)).scalars()]
    assert types.count("webhook.endpoint_disabled") == 1
    assert deliveries(rt)[0].status != "delivered"
