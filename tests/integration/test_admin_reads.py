"""Reads never write, and list endpoints run a fixed number of queries (issue 13).

* An admin key's ``last_used_at`` is written at most once a minute per key, so a GET is not a
  write (it was: every authenticated request committed an UPDATE).
* Each list endpoint runs the same number of statements for one row as for many (no query per
  row). The deliveries list is excluded here: it is being reworked separately.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlmodel import col

from connector import admin_keys
from connector.events.outbox import record_event
from connector.payments.machine import insert_payment
from connector.storage.db import UnitOfWork, transaction
from connector.storage.models.connections import AdminKey
from connector.storage.models.payments import Payment
from tests.fixtures.api import ApiHarness

PAYEE = "0x" + "11" * 20


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]).strip().split()[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def writes(seen: list[str]) -> list[str]:
    return [s for s in seen if s in ("INSERT", "UPDATE", "DELETE")]


def key_row(api: ApiHarness, scope: str) -> AdminKey:
    prefix = api.keys[scope][: len(admin_keys.KEY_PREFIX) + 8]
    with UnitOfWork(api.runtime.engine) as uow:
        row = uow.session.query(AdminKey).filter(col(AdminKey.prefix) == prefix).one()
        return row


def test_last_used_at_is_written_at_most_once_a_minute(api: ApiHarness) -> None:
    engine = api.runtime.engine
    with statements(engine) as first:
        assert api.client.get("/v1/admin/audit", headers=api.auth("read")).status_code == 200
    assert writes(first) == ["UPDATE"]  # first use recorded
    used = key_row(api, "read").last_used_at
    assert used is not None
    with statements(engine) as later:
        for _ in range(5):
            assert api.client.get("/v1/admin/payments", headers=api.auth("read")).status_code == 200
    assert writes(later) == []  # reads are reads
    assert key_row(api, "read").last_used_at == used
    # A minute later the next use is recorded again.
    with transaction(engine) as s:
        s.execute(
            update(AdminKey)
            .where(col(AdminKey.id) == key_row(api, "read").id)
            .values(last_used_at=datetime.now(UTC) - timedelta(minutes=2))
        )
    with statements(engine) as after:
        assert api.client.get("/v1/admin/audit", headers=api.auth("read")).status_code == 200
    assert writes(after) == ["UPDATE"]
    newer = key_row(api, "read").last_used_at
    assert newer is not None and newer > datetime.now(UTC) - timedelta(minutes=1)


def test_concurrent_first_uses_write_once(api: ApiHarness) -> None:
    key = key_row(api, "actions")
    with UnitOfWork(api.runtime.engine) as one, UnitOfWork(api.runtime.engine) as two:
        a = one.session.get(AdminKey, key.id)
        b = two.session.get(AdminKey, key.id)
        assert a is not None and b is not None
        assert admin_keys.note_use(one.session, a) is True
        one.commit()
        assert admin_keys.note_use(two.session, b) is False  # conditional: already recorded
        two.commit()


def add_rows(api: ApiHarness, n: int) -> None:
    """``n`` more rows of every listed kind (connections, keys, audit, payments, events)."""
    for _ in range(n):
        body = {
            "name": "agent",
            "network": "base-sepolia",
            "rpc_url": "https://rpc.example.com",
            "facilitator_url": "https://facilitator.example.com",
            "webhook_url": "https://hooks.example.com/x",
        }
        response = api.client.post("/v1/admin/connections", json=body, headers=api.auth())
        assert response.status_code == 201, response.text
        conn_id = response.json()["id"]
        with transaction(api.runtime.engine) as s:
            admin_keys.create_key(s, name="more", scopes=["read"])
            payment = Payment(
                id="pay_" + uuid.uuid4().hex[:20], connection_id=conn_id, direction="incoming",
                state="created", amount=5, asset=PAYEE, network="eip155:84532", payee=PAYEE,
            )  # fmt: skip
            insert_payment(s, payment)
            record_event(s, "connection.test_succeeded", conn_id, {"ok": True})


LISTS = [
    ("/v1/admin/connections", "read"),
    ("/v1/admin/keys", "admin"),
    ("/v1/admin/audit", "read"),
    ("/v1/admin/payments", "read"),
    ("/v1/admin/events", "read"),
]


@pytest.mark.parametrize(("path", "scope"), LISTS)
def test_list_endpoints_run_a_fixed_number_of_queries(
    api: ApiHarness, path: str, scope: str
) -> None:
    engine = api.runtime.engine
    add_rows(api, 1)
    api.client.get(path, headers=api.auth(scope))  # the key's use is recorded: not counted
    with statements(engine) as few:
        small = api.client.get(path, headers=api.auth(scope))
    add_rows(api, 6)
    with statements(engine) as many:
        large = api.client.get(path, headers=api.auth(scope))
    assert small.status_code == large.status_code == 200, large.text
    assert len(large.json()["data"]) > len(small.json()["data"])
    assert len(many) == len(few), (path, few, many)
    assert writes(many) == []


def test_a_write_is_committed_before_its_response_is_sent(
    api: ApiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed commit must be reported, not preceded by a 201 (FastAPI's default scope for a
    # dependency with yield runs the commit after the response has gone out).
    from connector.storage import db

    assert api.client.get("/v1/admin/connections", headers=api.auth()).status_code == 200
    real = db.UnitOfWork.commit

    def failing(self: db.UnitOfWork) -> None:
        raise RuntimeError("commit lost")

    monkeypatch.setattr(db.UnitOfWork, "commit", failing)
    body = {"name": "lost", "network": "base-sepolia", "rpc_url": "https://rpc.example.com",
            "facilitator_url": "https://facilitator.example.com"}  # fmt: skip
    response = api.client.post("/v1/admin/connections", json=body, headers=api.auth())
    monkeypatch.setattr(db.UnitOfWork, "commit", real)
    assert response.status_code == 500
    listed = api.client.get("/v1/admin/connections", headers=api.auth("read")).json()["data"]
    assert all(c["name"] != "lost" for c in listed)
