"""The broker transport: ours for Redis URLs (one sync client per channel), kombu's otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.settings import Settings
from workers.celery_app import make_celery
from workers.redis_transport import Transport


def test_a_redis_broker_uses_our_transport_and_one_sync_client(tmp_path: Path) -> None:
    app = make_celery(Settings(broker_url="redis://127.0.0.1:6379/13", data_dir=tmp_path))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        first, second = channel._create_client(), channel._create_client()
        assert first is second
        assert channel._create_client(asynchronous=True) is not first


@pytest.mark.parametrize("url", ["sentinel://127.0.0.1:26379", "amqp://127.0.0.1:5672//"])
def test_other_brokers_keep_kombus_transport(tmp_path: Path, url: str) -> None:
    app = make_celery(Settings(broker_url=url, data_dir=tmp_path))
    assert app.conf.broker_transport is None


def test_the_embedded_broker_waits_at_most_a_tenth_of_a_second_when_idle(tmp_path: Path) -> None:
    """Celery's blocking loop asks for 2 s waits; ours returns after 0.1 s without a message, so
    an idle embedded worker notices a shutdown at once (checked by the wait it asks for, not by
    a clock)."""
    from kombu.transport import memory as kombu_memory

    from workers.memory_transport import IDLE_WAIT_S, Transport

    app = make_celery(Settings(broker_url="memory://localhost/", data_dir=tmp_path))
    assert app.conf.broker_transport == "workers.memory_transport:Transport"
    asked: list[float | None] = []

    def record(self: object, connection: object, timeout: float | None = None) -> None:
        asked.append(timeout)

    original = kombu_memory.Transport.drain_events
    kombu_memory.Transport.drain_events = record  # type: ignore[method-assign]
    try:
        transport = Transport.__new__(Transport)
        transport.drain_events(None, timeout=2.0)
        transport.drain_events(None)
        transport.drain_events(None, timeout=0.01)
    finally:
        kombu_memory.Transport.drain_events = original  # type: ignore[method-assign]
    assert asked == [IDLE_WAIT_S, IDLE_WAIT_S, 0.01]


@pytest.mark.redis
def test_enqueueing_a_task_never_waits_for_its_result(tmp_path: Path, worker_id: str) -> None:
    """Our tasks keep their outcome in the database: an enqueue must not make the Redis result
    backend subscribe to the task's result channel (two Redis commands per job otherwise)."""
    import redis

    from workers.wiring import celery_dispatch

    base = int(os.environ.get("X402C_TEST_REDIS_DB_BASE", "1"))
    url = f"redis://127.0.0.1:6379/{base + (int(worker_id[2:]) if worker_id != 'master' else 0)}"
    app = make_celery(Settings(broker_url=url, data_dir=tmp_path))
    subscribed: list[str] = []
    app.backend.on_task_call = lambda producer, task_id: subscribed.append(task_id)
    broker = redis.Redis.from_url(url)
    broker.delete("celery")
    try:
        celery_dispatch(app)("x402c.run_job", ("job_x",))
        assert broker.llen("celery") == 1  # queued
        assert subscribed == []
    finally:
        broker.delete("celery", "_kombu.binding.celery", "_kombu.binding_permanent.celery")
        app.close()
