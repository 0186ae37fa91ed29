"""The job lease: one worker at a time runs a job.

A claim takes a job that is queued (or waiting on its payment), or ``running`` under a lease that
expired (its worker died), or ``running`` under the claim its own task retry hands over. Any other
delivery of the same task (a redelivered message, the stale-job sweep racing a slow worker, a
duplicate publish) finds the job running, changes nothing and returns ``running``.

The first part runs on SQLite and PostgreSQL; the last tests run the real Celery task function
on the fault rig (PostgreSQL, anvil, our facilitator).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from sqlalchemy.engine import Engine

from connector.actions import outcome
from connector.jobs import ClaimedJob, claim_job, job_lease, set_job_status, start_job
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import transaction
from connector.storage.models.payments import Job, Refund
from tests.fixtures.faults import FaultRig, money_invariants, worker_runtime_of

LEASE = job_lease(Settings())


def queued(engine: Engine, action: str = "balance", now: datetime | None = None) -> str:
    with transaction(engine) as s:
        return start_job(
            s, connection_id="conn_a", action=action, body={}, idempotency_key=None, now=now
        ).job.id


def claim(
    engine: Engine, job_id: str, now: datetime | None = None, handover: int | None = None
) -> ClaimedJob | Job:
    with transaction(engine) as s:
        return claim_job(s, job_id, now, lease=LEASE, handover=handover)


def row(engine: Engine, job_id: str) -> Job:
    with transaction(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_a_running_job_cannot_be_claimed_again_while_its_lease_lasts(engine: Engine) -> None:
    job_id = queued(engine)
    first = claim(engine, job_id)
    assert isinstance(first, ClaimedJob) and first.attempts == 1
    taken = row(engine, job_id)

    second = claim(engine, job_id)  # a second delivery of the same task message
    assert not isinstance(second, ClaimedJob)
    assert second.status == "running"
    after = row(engine, job_id)
    assert (after.status, after.attempts, after.updated_at) == (
        "running",
        1,
        taken.updated_at,
    )  # untouched: the lease still runs from the first claim


def test_a_running_job_whose_lease_expired_is_claimed_by_the_next_delivery(
    engine: Engine,
) -> None:
    now = datetime.now(UTC)
    job_id = queued(engine, now=now - 2 * LEASE)
    claim(engine, job_id, now=now - LEASE - timedelta(seconds=1))  # its worker died since
    claim(engine, job_id, now=now - LEASE + timedelta(seconds=1))  # too early: changes nothing
    assert row(engine, job_id).attempts == 1
    again = claim(engine, job_id, now=now)
    assert isinstance(again, ClaimedJob) and again.attempts == 2


def test_the_retry_of_a_claim_takes_its_running_job_over_once(engine: Engine) -> None:
    """A task whose database connection dropped retries while the row still says ``running``
    under its own claim: the claim's attempt number, passed to the retry, lets it in at once."""
    job_id = queued(engine)
    first = claim(engine, job_id)
    assert isinstance(first, ClaimedJob)
    assert not isinstance(claim(engine, job_id, handover=first.attempts + 1), ClaimedJob)
    retry = claim(engine, job_id, handover=first.attempts)
    assert isinstance(retry, ClaimedJob) and retry.attempts == first.attempts + 1
    # the token is used up: the same retry message delivered twice does not run twice
    assert not isinstance(claim(engine, job_id, handover=first.attempts), ClaimedJob)
    assert row(engine, job_id).attempts == 2


@pytest.mark.parametrize("status", ["queued", "pending", "requires_approval"])
def test_queued_and_waiting_jobs_are_claimed_finished_ones_never(
    engine: Engine, status: str
) -> None:
    job_id = queued(engine)
    with transaction(engine) as s:
        set_job_status(s, job_id, status)
    assert isinstance(claim(engine, job_id), ClaimedJob)
    with transaction(engine) as s:
        set_job_status(s, job_id, "succeeded", result={"ok": True})
    done = claim(engine, job_id, handover=1)
    assert isinstance(done, Job) and done.status == "succeeded" and done.result == {"ok": True}


def test_a_second_delivery_of_a_running_job_changes_nothing_and_answers_running(
    engine: Engine, tmp_path: Path
) -> None:
    """The action service, as the task calls it: the job is running in another worker, so this
    delivery neither runs the action nor touches the job (before the lease it claimed the job
    again and, here, failed it: its connection does not exist)."""
    from connector.actions import service

    rt = Runtime(settings=Settings(data_dir=tmp_path), engine=engine)
    job_id = queued(engine)
    claim(engine, job_id)
    before = row(engine, job_id)

    found = service.run(rt, job_id)
    assert found == outcome.Outcome(outcome.RUNNING, None, None)
    assert service.run_job(rt, job_id) is None
    after = row(engine, job_id)
    assert (after.status, after.attempts, after.updated_at, after.error, after.result) == (
        before.status,
        before.attempts,
        before.updated_at,
        before.error,
        before.result,
    )


def test_the_sweep_and_the_claim_share_one_lease(engine: Engine, tmp_path: Path) -> None:
    """``requeue_stale_jobs`` re-sends a running job exactly when a claim may take it over, and
    puts it back in the queue, so the message it sends is not turned away by the dead lease."""
    from connector.payments.maintenance import requeue_stale_jobs

    sent: list[tuple[str, tuple[object, ...]]] = []
    rt = Runtime(settings=Settings(data_dir=tmp_path, task_time_limit_s=60), engine=engine)
    rt.dispatch = lambda task, args: sent.append((task, args))
    lease = job_lease(rt.settings)
    assert lease != LEASE  # the configured time limit, not the default
    now = datetime.now(UTC)
    job_id = queued(engine, now=now - 2 * lease)
    with transaction(engine) as s:
        assert isinstance(claim_job(s, job_id, now - lease, lease=lease), ClaimedJob)

    early = now - timedelta(seconds=1)
    assert requeue_stale_jobs(rt, now=early, queued_after=timedelta(hours=1)) == 0
    with transaction(engine) as s:
        assert not isinstance(claim_job(s, job_id, early, lease=lease), ClaimedJob)

    assert requeue_stale_jobs(rt, now=now, queued_after=timedelta(hours=1)) == 1
    assert sent == [("x402c.run_job", (job_id,))]
    assert (row(engine, job_id).status, row(engine, job_id).attempts) == ("queued", 1)
    with transaction(engine) as s:  # the message the sweep sent claims it
        again = claim_job(s, job_id, now + timedelta(seconds=1), lease=lease)
    assert isinstance(again, ClaimedJob) and again.attempts == 2


# --------------------------------------------------- the real task function on the fault rig


def _refund_job(rig: FaultRig, accounts: list[LocalAccount]) -> tuple[str, str]:
    from tests.integration.test_faults import _paid_incoming

    seller = rig.connection(accounts[8])
    answer, _, _ = _paid_incoming(rig, seller, accounts[4], 400)
    assert answer.status == 200 and answer.payment_id is not None
    return rig.job(seller, "refund", {"payment_id": answer.payment_id, "amount": "150"}), str(
        answer.payment_id
    )


def _refunds_of(rig: FaultRig, payment_id: str) -> list[Refund]:
    with transaction(rig.rt.engine) as s:
        return list(s.execute(select(Refund).where(Refund.payment_id == payment_id)).scalars())


@pytest.mark.chain
@pytest.mark.postgres
def test_a_duplicate_delivery_of_a_running_refund_runs_it_once(
    rig: FaultRig, accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same ``run_job`` message delivered twice at once: the second delivery arrives while
    the first runs the refund, answers ``running`` and is done (its message acknowledged)."""
    from connector.actions import service
    from workers.tasks import run_job as run_job_task

    job, payment_id = _refund_job(rig, accounts)
    ran: list[int] = []
    duplicate: list[Any] = []
    real = service.HANDLERS["refund"]

    def deliver_again() -> None:
        other = threading.Thread(target=lambda: duplicate.append(run_job_task.apply(args=[job])))
        other.start()
        other.join(timeout=60)

    def observed(rt: Runtime, ctx: Any, inp: Any, claimed: ClaimedJob) -> Any:
        ran.append(claimed.attempts)
        if len(ran) == 1:  # the duplicate arrives while the first delivery is inside the action
            deliver_again()
        return real(rt, ctx, inp, claimed)

    monkeypatch.setitem(service.HANDLERS, "refund", observed)
    with worker_runtime_of(rig):
        first = run_job_task.apply(args=[job])
    assert first.successful(), first.traceback
    assert duplicate and duplicate[0].successful(), duplicate[0].traceback
    assert (first.result, duplicate[0].result) == ("succeeded", "running")
    assert ran == [1]  # the refund ran once
    assert (rig.job_row(job).status, rig.job_row(job).attempts) == ("succeeded", 1)
    refunds = _refunds_of(rig, payment_id)
    assert [(r.amount, r.state) for r in refunds] == [(150, "succeeded")]
    assert rig.payment(payment_id).refunded_amount == 150
    assert money_invariants(rig) == []


@pytest.mark.chain
@pytest.mark.postgres
def test_a_refund_whose_connection_drops_is_retried_at_once_through_its_handover(
    rig: FaultRig, accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim committed, then the database connection dropped: the row still says
    ``running`` under that claim. The task's quick retry carries the claim's attempt number and
    takes the job over at once (without it, it would wait for the lease to expire)."""
    from connector.actions import service
    from workers.tasks import run_job as run_job_task

    job, payment_id = _refund_job(rig, accounts)
    ran: list[int] = []
    real = service.HANDLERS["refund"]

    def observed(rt: Runtime, ctx: Any, inp: Any, claimed: ClaimedJob) -> Any:
        ran.append(claimed.attempts)
        if len(ran) == 1:
            assert rig.job_row(job).status == "running"  # the claim is committed
            rig.drop_db_connections()
        return real(rt, ctx, inp, claimed)

    monkeypatch.setitem(service.HANDLERS, "refund", observed)
    with worker_runtime_of(rig):
        result = run_job_task.apply(args=[job])
    assert result.successful(), result.traceback
    assert result.result == "succeeded"
    assert ran == [1, 2]
    assert (rig.job_row(job).status, rig.job_row(job).attempts) == ("succeeded", 2)
    assert [(r.amount, r.state) for r in _refunds_of(rig, payment_id)] == [(150, "succeeded")]
    assert money_invariants(rig) == []
