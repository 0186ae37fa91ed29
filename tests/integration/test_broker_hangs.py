"""A broker that accepts connections and never answers (a hung Redis, a half-open network path).

Publishing is on the request path (an action's job is enqueued after its row commits) and on the
commit path (the webhook dispatcher is woken after events commit). A publish that blocks without
end used to stall each request and each committing worker thread that met it, until the API's
thread pool was exhausted. Each publish must give up within its timeouts, and once the broker has
failed, callers must not each pay those timeouts again: they fail fast until a cool-down passes.
"""

from __future__ import annotations

from typing import Any

import pytest

from connector.settings import Settings
from tests.fixtures.api import ApiHarness
from tests.fixtures.net import finishes
from tests.integration.test_api_admin import connection_body
from workers.celery_app import make_celery
from workers.wiring import BrokerUnavailable, PublishBreaker, celery_dispatch

pytestmark = pytest.mark.slow


@pytest.fixture
def hung_broker(silent_server: int) -> str:
    return f"redis://127.0.0.1:{silent_server}/0"


def test_a_publish_to_a_hung_broker_gives_up_with_an_error(hung_broker: str) -> None:
    dispatch = celery_dispatch(make_celery(Settings(broker_url=hung_broker, broker_timeout_s=1)))
    errors = finishes(lambda: dispatch("x402c.run_job", ("job_1",)))  # the timeouts total ~1 s
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

    # Without timeouts the first submission never answers.
    assert finishes(submit_three, timeout_s=90) == []
