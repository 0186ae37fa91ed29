"""Idempotency-Key semantics of action jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine

from connector.jobs import (
    IdempotencyInFlight,
    IdempotencyMismatch,
    finish_request,
    purge_expired,
    start_job,
)
from connector.storage.db import transaction

BODY = {"to": "0x" + "1" * 40, "amount": "5"}


def start(
    engine: Engine, key: str | None, body: dict[str, str] = BODY, now: datetime | None = None
):  # type: ignore[no-untyped-def]
    with transaction(engine) as s:
        return start_job(
            s, connection_id="conn_a", action="send", body=body, idempotency_key=key, now=now
        )


def test_same_key_same_body_replays_the_same_job(engine: Engine) -> None:
    first = start(engine, "k1")
    assert first.created
    with pytest.raises(IdempotencyInFlight):
        start(engine, "k1")
    with transaction(engine) as s:
        finish_request(s, first.idempotency_record_id)
    again = start(engine, "k1")
    assert not again.created
    assert again.job.id == first.job.id


def test_same_key_different_body_is_422(engine: Engine) -> None:
    first = start(engine, "k2")
    with transaction(engine) as s:
        finish_request(s, first.idempotency_record_id)
    with pytest.raises(IdempotencyMismatch) as info:
        start(engine, "k2", {**BODY, "amount": "6"})
    assert info.value.status == 422


def test_keys_are_scoped_per_action_and_missing_key_always_creates(engine: Engine) -> None:
    def balance() -> str:
        with transaction(engine) as s:
            started = start_job(
                s, connection_id="conn_a", action="balance", body={}, idempotency_key=None
            )
            return started.job.id

    assert balance() != balance()  # an action that moves no money needs no key
    with transaction(engine) as s:
        other = start_job(
            s, connection_id="conn_a", action="refund", body=BODY, idempotency_key="k1"
        )
    assert other.created


@pytest.mark.parametrize("action", ["send", "refund", "release"])
def test_a_money_moving_action_without_a_key_is_refused_and_creates_nothing(
    engine: Engine, action: str
) -> None:
    from sqlalchemy import func, select

    from connector.jobs import IdempotencyKeyRequired
    from connector.storage.models.payments import Job

    with pytest.raises(IdempotencyKeyRequired) as info, transaction(engine) as s:
        start_job(s, connection_id="conn_a", action=action, body=BODY, idempotency_key=None)
    assert info.value.status == 428 and info.value.code == "idempotency_key_required"
    with transaction(engine) as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 0


def test_natural_key_needs_both_run_and_node() -> None:
    from connector.jobs import natural_key

    assert natural_key("run_1", "node_a") == "wf:run_1:node_a"
    assert natural_key("run_1", "node_a", "3") == "wf:run_1:node_a:3"
    assert natural_key("run_1", None) is None and natural_key(None, "node_a") is None
    # a ':' inside a part cannot make two different (run, node) pairs share a key
    assert natural_key("a:b", "c") != natural_key("a", "b:c")


def test_expired_keys_are_forgotten(engine: Engine) -> None:
    past = datetime.now(UTC) - timedelta(hours=72)
    old = start(engine, "k3", now=past)
    with transaction(engine) as s:
        assert purge_expired(s) == 1
    fresh = start(engine, "k3")
    assert fresh.created and fresh.job.id != old.job.id


def test_stale_jobs_are_requeued_from_the_database(engine: Engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from connector.payments.maintenance import requeue_stale_jobs
    from connector.runtime import Runtime
    from connector.settings import Settings

    sent: list[tuple[str, tuple[object, ...]]] = []
    rt = Runtime(settings=Settings(data_dir=tmp_path), engine=engine)
    rt.dispatch = lambda task, args: sent.append((task, args))
    old = start(engine, "stale-1", now=datetime.now(UTC) - timedelta(minutes=5))
    fresh = start(engine, "stale-2")
    assert requeue_stale_jobs(rt) == 1
    assert sent == [("x402c.run_job", (old.job.id,))]
    assert requeue_stale_jobs(rt) == 0  # touched: not again before the next threshold
    assert fresh.job.id not in {args[0] for _, args in sent}


def test_losing_a_key_race_leaves_no_orphan_job(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request B checked the key before request A stored it; A then finished. B's insert of the
    key fails, B answers with A's job — and must not commit the job it had created meanwhile
    (a queued orphan would later be run by the stale-job sweep: a second payment)."""
    from sqlalchemy import select

    import connector.jobs as jobs
    from connector.storage.models.payments import Job

    winner = start(engine, "race")
    with transaction(engine) as s:
        finish_request(s, winner.idempotency_record_id)
    real = jobs._live_record
    calls = []

    def first_look_misses(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return None if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(jobs, "_live_record", first_look_misses)
    loser = start(engine, "race")
    assert not loser.created and loser.job.id == winner.job.id
    with transaction(engine) as s:
        rows = s.execute(select(Job.id).where(Job.connection_id == "conn_a")).scalars().all()
    assert rows == [winner.job.id]
