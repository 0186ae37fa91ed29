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


@pytest.mark.parametrize("url", ["memory://", "sentinel://127.0.0.1:26379"])
def test_other_brokers_keep_kombus_transport(tmp_path: Path, url: str) -> None:
    app = make_celery(Settings(broker_url=url, data_dir=tmp_path))
    assert app.conf.broker_transport is None


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
