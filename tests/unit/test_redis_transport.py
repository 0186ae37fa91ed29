"""The broker transport: ours for Redis URLs (one sync client per channel), kombu's otherwise."""

from __future__ import annotations

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
