"""/healthz reports each dependency and answers while one is down or hanging; an action
submission never blocks the event loop (a stuck broker publish used to stall every request)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from api.app import create_app
from api.stack import ServerThread, free_port
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import make_engine
from connector.vault import MasterKeyRing
from tests.fixtures.api import ApiHarness
from tests.integration.test_api_admin import connection_body


def _app(engine: Engine, tmp_path: Path, **settings: Any) -> TestClient:
    rt = Runtime(
        settings=Settings(
            data_dir=tmp_path, master_keys=MasterKeyRing.generate_spec("t1"), **settings
        ),
        engine=engine,
    )
    return TestClient(create_app(runtime=rt))


def _closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def test_healthz_reports_ok_with_every_check(api: ApiHarness) -> None:
    body = _wait_for(api.client, lambda b: b["checks"]["beat"]["status"] != "unknown")
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["broker"]["status"] == "ok"
    # No beat runs in this test: the service is degraded (nothing expires holds, requeues jobs).
    assert body["checks"]["beat"]["status"] == "down"
    assert body["status"] == "degraded"
    assert body["beat"] == {"last_tick_at": None, "age_s": None, "ok": False}


def test_healthz_names_the_broker_when_redis_is_unreachable(engine: Engine, tmp_path: Path) -> None:
    client = _app(engine, tmp_path, broker_url=f"redis://127.0.0.1:{_closed_port()}/0")
    body = _wait_for(client, lambda b: b["checks"]["broker"]["status"] == "down")
    assert body["status"] == "degraded"  # the API still takes work; the sweep enqueues it later
    assert body["checks"]["database"]["status"] == "ok"
    assert "127.0.0.1" not in str(body)  # no connection details


@pytest.mark.postgres
def test_healthz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    port = _closed_port()
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nope")
    client = _app(engine, tmp_path)
    body = _wait_for(client, lambda b: b["checks"]["database"]["status"] == "down", status=503)
    assert body["status"] == "down"
    assert "postgres" not in str(body)


def test_healthz_answers_while_a_probe_hangs(api: ApiHarness) -> None:
    release = threading.Event()
    health = api.client.app.state.health  # type: ignore[attr-defined]
    health.timeout_s = 0.2
    health.add("stuck", lambda: release.wait(60) and None, critical=False)
    try:
        first = api.client.get("/healthz").json()  # returns although the probe is blocked
        assert first["checks"]["stuck"]["status"] in ("unknown", "down")
        assert not release.is_set()
        body = _wait_for(api.client, lambda b: b["checks"]["stuck"]["status"] == "down")
        assert body["status"] == "degraded"
        assert not release.is_set()
    finally:
        release.set()


def _wait_for(client: TestClient, ready: Any, status: int = 200) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 60
    while True:
        response = client.get("/healthz")
        body: dict[str, Any] = response.json()
        if ready(body):
            assert response.status_code == status, body
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_a_stuck_broker_publish_does_not_stall_other_requests(api: ApiHarness) -> None:
    created = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())
    connection_id = created.json()["id"]
    entered, release = threading.Event(), threading.Event()

    def stuck_dispatch(task: str, args: tuple[Any, ...]) -> None:
        entered.set()
        release.wait(60)

    api.runtime.dispatch = stuck_dispatch
    server = ServerThread(api.client.app, free_port()).start()
    answers: dict[str, int] = {}

    def submit() -> None:
        response = httpx.post(
            f"{server.url}/v1/connections/{connection_id}/actions/receive",
            json={"amount": "1"},
            headers=api.auth(),
            timeout=90,
        )
        answers["submit"] = response.status_code

    worker = threading.Thread(target=submit)
    worker.start()
    try:
        assert entered.wait(60), "the submission never reached the broker"
        # The publish is stuck; the event loop must still serve everything else.
        assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200
        jobs = httpx.get(f"{server.url}/v1/admin/keys", headers=api.auth(), timeout=60)
        assert jobs.status_code == 200
        assert not release.is_set() and "submit" not in answers
    finally:
        release.set()
        worker.join(90)
        server.stop()
    assert answers["submit"] == 202


def test_a_failed_publish_still_answers_202_with_a_queued_job(api: ApiHarness) -> None:
    created = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())

    def broker_down(task: str, args: tuple[Any, ...]) -> None:
        raise ConnectionRefusedError("broker down")

    api.runtime.dispatch = broker_down
    response = api.client.post(
        f"/v1/connections/{created.json()['id']}/actions/receive",
        json={"amount": "1"},
        headers=api.auth(),
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"  # the stale-job sweep enqueues it later
