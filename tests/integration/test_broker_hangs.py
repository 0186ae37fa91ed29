"""A broker that accepts connections and never answers (a hung Redis, a half-open network path).

Publishing is on the request path (an action's job is enqueued after its row commits) and on the
commit path (the webhook dispatcher is woken after events commit). A publish that blocks without
end used to stall each request and each committing worker thread that met it, until the API's
thread pool was exhausted. Each publish must give up within its timeouts, and once the broker has
failed, callers must not each pay those timeouts again: they fail fast until a cool-down passes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from connector.settings import Settings
from tests.fixtures.api import ApiHarness
from tests.integration.test_api_admin import connection_body
from workers.celery_app import make_celery
from workers.wiring import BrokerUnavailable, PublishBreaker, celery_dispatch

pytestmark = pytest.mark.slow


@pytest.fixture
def hung_broker() -> Iterator[str]:
    """A loopback TCP server that accepts every connection, reads and never writes a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def _in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_publish_to_a_hung_broker_gives_up_with_an_error(hung_broker: str) -> None:
    dispatch = celery_dispatch(make_celery(Settings(broker_url=hung_broker, broker_timeout_s=1)))
    thread, errors = _in_thread(lambda: dispatch("x402c.run_job", ("job_1",)))
    thread.join(60)  # a hang detector, not a speed check: the timeouts total a few seconds
    assert not thread.is_alive(), "the publish is still blocked on the hung broker"
    assert errors, "a publish that reached no broker must raise"


def test_after_a_failed_publish_callers_fail_fast_until_the_cool_down_passes() -> None:
    attempts: list[str] = []
    outcome: dict[str, Exception | None] = {"error": ConnectionRefusedError("broker down")}
    clock = [100.0]

    def publish(task: str, args: tuple[Any, ...]) -> None:
        attempts.append(task)
        error = outcome["error"]
        if error is not None:
            raise error

    breaker = PublishBreaker(
        publish, first_cool_down_s=2.0, max_cool_down_s=8.0, clock=lambda: clock[0]
    )
    with pytest.raises(ConnectionRefusedError):
        breaker("t", ())
    for _ in range(5):  # within the cool-down: no attempt reaches the broker
        with pytest.raises(BrokerUnavailable):
            breaker("t", ())
    assert len(attempts) == 1
    clock[0] += 2.1  # cool-down over: one caller tries again, fails, the cool-down doubles
    with pytest.raises(ConnectionRefusedError):
        breaker("t", ())
    clock[0] += 2.1
    with pytest.raises(BrokerUnavailable):
        breaker("t", ())
    assert len(attempts) == 2
    clock[0] += 2.0  # 4.1 s after the second failure: past the doubled cool-down
    outcome["error"] = None
    breaker("t", ())  # the broker is back: the call goes through and the breaker closes
    breaker("t", ())
    assert len(attempts) == 4


def test_actions_are_accepted_while_the_broker_hangs(api: ApiHarness, hung_broker: str) -> None:
    app = make_celery(Settings(broker_url=hung_broker, broker_timeout_s=1))
    api.runtime.dispatch = celery_dispatch(app)
    created = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())
    assert created.status_code == 201, created.text

    def submit_three() -> None:
        for _ in range(3):
            response = api.client.post(
                f"/v1/connections/{created.json()['id']}/actions/receive",
                json={"amount": "1"},
                headers=api.auth(),
            )
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "queued"  # the stale-job sweep sends it later

    thread, errors = _in_thread(submit_three)
    thread.join(90)  # a hang detector: without timeouts the first submission never answers
    assert not thread.is_alive(), "a submission is blocked on the hung broker"
    assert errors == []
