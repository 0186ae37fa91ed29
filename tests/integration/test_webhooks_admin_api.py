"""Admin API for deliveries: the list's query count, redelivery and retry-pending."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from connector.ids import new_id
from connector.storage.db import transaction
from connector.storage.models.events import Delivery, DeliveryAttempt, Event, Subscription
from tests.fixtures.api import ApiHarness


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def subscription(engine: Engine, connection_id: str | None = None) -> str:
    sub_id = new_id("sub")
    with transaction(engine) as s:
        s.add(Subscription(id=sub_id, connection_id=connection_id, url="https://h.example/x",
                           secret_token="unused"))  # fmt: skip
    return sub_id


def deliveries(
    engine: Engine, sub_id: str, status: str, n: int, *, attempts: int = 0, **extra: Any
) -> list[str]:
    ids = []
    with transaction(engine) as s:
        for _ in range(n):
            event_id, delivery_id = new_id("evt"), new_id("whd")
            s.add(Event(id=event_id, type="webhook.test", payload={"id": event_id}))
            s.add(Delivery(id=delivery_id, event_id=event_id, subscription_id=sub_id,
                           status=status, attempts=attempts, **extra))  # fmt: skip
            for attempt in range(1, attempts + 1):
                s.add(DeliveryAttempt(id=new_id("wha"), delivery_id=delivery_id, attempt=attempt,
                                      status_code=503, outcome="retry"))  # fmt: skip
            ids.append(delivery_id)
    return ids


def rows(engine: Engine) -> dict[str, Delivery]:
    with transaction(engine) as s:
        return {d.id: d for d in s.execute(select(Delivery)).scalars()}


def test_the_deliveries_list_takes_the_same_few_queries_for_3_rows_or_60(api: ApiHarness) -> None:
    engine = api.runtime.engine
    sub_id = subscription(engine)
    deliveries(engine, sub_id, "dead", 3, attempts=3)

    def listing(limit: int) -> tuple[list[dict[str, Any]], int]:
        api.client.get("/v1/admin/deliveries?limit=1", headers=api.auth("read"))  # warm
        with counted(engine) as statements:
            response = api.client.get(
                f"/v1/admin/deliveries?limit={limit}", headers=api.auth("read")
            )
        assert response.status_code == 200
        return response.json()["data"], len(statements)

    small, few = listing(50)
    assert len(small) == 3
    assert [a["attempt"] for a in small[0]["attempt_log"]] == [1, 2, 3]
    deliveries(engine, sub_id, "pending", 57, attempts=2)
    large, many = listing(60)
    assert len(large) == 60
    assert many == few  # not one more per row
    assert all(len(d["attempt_log"]) == d["attempts"] for d in large)
    assert {a["delivery_id"] for d in large for a in d["attempt_log"]} <= {d["id"] for d in large}
    assert all({a["delivery_id"] for a in d["attempt_log"]} <= {d["id"]} for d in large)


def test_retry_pending_makes_waiting_deliveries_due_now_for_one_connection_or_all(
    api: ApiHarness,
) -> None:
    engine = api.runtime.engine
    later = datetime.now(UTC) + timedelta(hours=5)
    mine, theirs = subscription(engine, "conn_a"), subscription(engine, "conn_b")
    waiting_mine = deliveries(engine, mine, "pending", 2, attempts=3, next_attempt_at=later)
    waiting_theirs = deliveries(engine, theirs, "pending", 1, attempts=3, next_attempt_at=later)
    finished = deliveries(engine, mine, "dead", 1, next_attempt_at=later)
    response = api.client.post(
        "/v1/admin/deliveries/retry-pending", json={"connection_id": "conn_a"}, headers=api.auth()
    )
    assert response.status_code == 200 and response.json() == {"requeued": 2}
    state = rows(engine)
    assert all(state[i].next_attempt_at <= datetime.now(UTC) for i in waiting_mine)  # type: ignore[operator]
    assert state[waiting_theirs[0]].next_attempt_at == later
    assert state[finished[0]].status == "dead"  # only waiting deliveries, never finished ones
    assert ("x402c.dispatch_webhooks", ()) in api.dispatched
    # No body at all: everything still waiting.
    response = api.client.post("/v1/admin/deliveries/retry-pending", headers=api.auth())
    assert response.json() == {"requeued": 1}
    assert rows(engine)[waiting_theirs[0]].next_attempt_at <= datetime.now(UTC)  # type: ignore[operator]
    assert (
        api.client.post("/v1/admin/deliveries/retry-pending", headers=api.auth("read")).status_code
        == 403
    )


def test_bulk_redeliver_takes_failed_and_dead_by_default_and_other_statuses_on_request(
    api: ApiHarness,
) -> None:
    engine = api.runtime.engine
    now = datetime.now(UTC)
    sub_id = subscription(engine)
    failed = deliveries(engine, sub_id, "failed", 1, updated_at=now)
    dead = deliveries(engine, sub_id, "dead", 1, updated_at=now)
    delivered = deliveries(engine, sub_id, "delivered", 1, updated_at=now)
    old = deliveries(engine, sub_id, "dead", 1, updated_at=now - timedelta(days=3))
    since = (now - timedelta(days=1)).isoformat()
    url = "/v1/admin/deliveries/redeliver"
    assert api.client.post(url, json={"since": since}, headers=api.auth()).json() == {"requeued": 2}
    state = rows(engine)
    assert {state[i].status for i in failed + dead} == {"pending"}
    assert state[delivered[0]].status == "delivered" and state[old[0]].status == "dead"
    body = {"since": since, "statuses": ["delivered"]}
    assert api.client.post(url, json=body, headers=api.auth()).json() == {"requeued": 1}
    assert rows(engine)[delivered[0]].status == "pending"
    bad = api.client.post(url, json={"since": since, "statuses": ["sending"]}, headers=api.auth())
    assert bad.status_code == 422


def test_redeliver_one_refuses_a_delivery_in_flight_and_an_unknown_one(api: ApiHarness) -> None:
    engine = api.runtime.engine
    sub_id = subscription(engine)
    leased = datetime.now(UTC) + timedelta(minutes=30)
    (sending,) = deliveries(engine, sub_id, "sending", 1, lease_until=leased, lease_owner="w1")
    (dead,) = deliveries(engine, sub_id, "dead", 1)
    url = "/v1/admin/deliveries/{}/redeliver"
    assert api.client.post(url.format(sending), headers=api.auth()).status_code == 409
    assert rows(engine)[sending].lease_owner == "w1"  # the sender keeps its lease
    assert api.client.post(url.format("whd_nope"), headers=api.auth()).status_code == 404
    response = api.client.post(url.format(dead), headers=api.auth())
    assert response.status_code == 200 and rows(engine)[dead].status == "pending"
