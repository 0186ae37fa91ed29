"""The fence on a run's writes to its own job: a run that outlived its lease writes nothing.

Celery's ``threads`` and ``solo`` pools do not enforce the task time limit, so a slow run can
outlive its lease: the stale-job sweep sends the job again and a second run claims it. Every
write a run makes to its job after its claim (outcome, ``queued`` on a retryable error, the
``internal_error`` requeue, the link of its payment) applies only while the row's ``attempts``
is still the one of that run's claim. The stale run's write is refused; the run logs it and
answers with the outcome the row holds.

SQLite and PostgreSQL: the writes themselves, then the action service with a real ``receive``
whose first run is held inside the action while a second run takes the job over. Last, a direct
``send`` on the fault rig (PostgreSQL, anvil, our facilitator).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy.engine import Engine

from connector.actions import outcome, service
from connector.errors import ExternalServiceError, NotFound
from connector.jobs import ClaimedJob, claim_job, job_lease, link_payment, set_job_status, start_job
from connector.payments.maintenance import requeue_stale_jobs
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import transaction
from connector.storage.models.payments import Job
from tests.fixtures.api import ApiHarness
from tests.fixtures.faults import FaultRig, money_invariants
from tests.integration.test_api_admin import connection_body

LEASE = job_lease(Settings())


def _job(
    engine: Engine, connection_id: str, action: str, body: dict[str, Any], at: datetime
) -> str:
    with transaction(engine) as s:
        key = f"key-{action}" if action == "send" else None  # a send needs one
        return start_job(
            s, connection_id=connection_id, action=action, body=body, idempotency_key=key, now=at
        ).job.id


def _claim(engine: Engine, job_id: str, now: datetime) -> ClaimedJob:
    with transaction(engine) as s:
        claimed = claim_job(s, job_id, now, lease=LEASE)
    assert isinstance(claimed, ClaimedJob)
    return claimed


def _row(engine: Engine, job_id: str) -> Job:
    with transaction(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


# ------------------------------------------------------------------------------ the writes


def test_a_run_taken_over_writes_nothing_to_its_job(engine: Engine) -> None:
    """Run 1 claims; its lease expires and run 2 claims and finishes. Run 1's outcome, its
    ``queued`` reset and its payment link are all refused: the row keeps run 2's outcome."""
    t0 = datetime.now(UTC) - 2 * LEASE
    job_id = _job(engine, "conn_a", "balance", {}, t0)
    first = _claim(engine, job_id, t0)
    second = _claim(engine, job_id, t0 + LEASE + timedelta(seconds=1))  # the lease expired
    assert (first.attempts, second.attempts) == (1, 2)

    done = outcome.Outcome(outcome.SUCCEEDED, {"run": 2})
    with transaction(engine) as s:
        assert outcome.write(s, job_id, done, claim=second.attempts)

    stale = outcome.Outcome(outcome.FAILED, {"run": 1}, {"code": "stale"})
    with transaction(engine) as s:
        assert not outcome.write(s, job_id, stale, payment_id="pay_stale", claim=first.attempts)
        assert not set_job_status(s, job_id, "queued", error={"code": "x"}, claim=first.attempts)
        assert not link_payment(s, job_id, "pay_stale", claim=first.attempts)
    after = _row(engine, job_id)
    assert (after.status, after.result, after.error, after.attempts, after.payment_id) == (
        "succeeded",
        {"run": 2},
        None,
        2,
        None,
    )


def test_a_stale_run_cannot_put_a_job_another_run_holds_back_in_the_queue(engine: Engine) -> None:
    t0 = datetime.now(UTC) - 2 * LEASE
    job_id = _job(engine, "conn_a", "balance", {}, t0)
    first = _claim(engine, job_id, t0)
    _claim(engine, job_id, t0 + LEASE + timedelta(seconds=1))
    with transaction(engine) as s:
        assert not set_job_status(s, job_id, "queued", error={"code": "x"}, claim=first.attempts)
    assert (_row(engine, job_id).status, _row(engine, job_id).attempts) == ("running", 2)


def test_writes_that_are_not_a_runs_own_are_not_fenced(engine: Engine) -> None:
    """A job following its payment (approvals, the reconciler, a settlement undone by a
    reorganization) is written by whoever moves the payment, whatever run claimed it last."""
    t0 = datetime.now(UTC) - 2 * LEASE
    job_id = _job(engine, "conn_a", "send", {}, t0)
    _claim(engine, job_id, t0)
    _claim(engine, job_id, t0 + LEASE + timedelta(seconds=1))
    with transaction(engine) as s:
        assert link_payment(s, job_id, "pay_x")
        assert outcome.write(s, job_id, outcome.Outcome(outcome.PENDING, {"followed": True}))
    after = _row(engine, job_id)
    assert (after.status, after.result, after.payment_id) == (
        "pending",
        {"followed": True},
        "pay_x",
    )


def test_the_sweeps_requeue_keeps_the_runs_claim(engine: Engine, tmp_path: Any) -> None:
    """The sweep puts a job whose lease expired back in the queue without claiming it: until a
    new run claims it, the slow run's outcome is still the job's (a real outcome, recorded)."""
    rt = Runtime(settings=Settings(data_dir=tmp_path), engine=engine)
    rt.dispatch = lambda task, args: None
    t0 = datetime.now(UTC) - 2 * LEASE
    job_id = _job(engine, "conn_a", "balance", {}, t0)
    first = _claim(engine, job_id, t0)
    assert requeue_stale_jobs(rt, queued_after=timedelta(hours=1)) == 1
    with transaction(engine) as s:
        assert outcome.write(s, job_id, outcome.Outcome("succeeded", {"run": 1}), claim=1)
    assert first.attempts == 1
    after = _row(engine, job_id)
    assert (after.status, after.result, after.attempts) == ("succeeded", {"run": 1}, 1)
    with transaction(engine) as s:  # the message the sweep sent finds it finished
        assert isinstance(claim_job(s, job_id, lease=LEASE), Job)


# ------------------------------------------------------------------ through the action service


@dataclass
class Held:
    """A ``receive`` handler whose first run waits inside the action until released, then does
    what ``then`` says (returns the real answer, or raises)."""

    then: Callable[[], None]
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    second_entered: threading.Event = field(default_factory=threading.Event)
    second_release: threading.Event = field(default_factory=threading.Event)
    hold_second: bool = False
    ran: list[int] = field(default_factory=list)


@pytest.fixture
def connection_id(api: ApiHarness) -> str:
    response = api.client.post("/v1/admin/connections", json=connection_body(), headers=api.auth())
    assert response.status_code == 201, response.text
    cid: str = response.json()["id"]
    return cid


def _install(monkeypatch: pytest.MonkeyPatch, held: Held) -> None:
    real = service.HANDLERS["receive"]

    def slow(rt: Runtime, ctx: Any, inp: Any, claimed: ClaimedJob) -> Any:
        held.ran.append(claimed.attempts)
        if claimed.attempts == 1:
            held.entered.set()
            assert held.release.wait(60)  # a guard against a hang, not a timing assumption
            held.then()
        elif held.hold_second:
            held.second_entered.set()
            assert held.second_release.wait(60)
        return real(rt, ctx, inp, claimed)

    monkeypatch.setitem(service.HANDLERS, "receive", slow)


@dataclass
class Background:
    thread: threading.Thread
    found: list[outcome.Outcome] = field(default_factory=list)
    raised: list[BaseException] = field(default_factory=list)

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


def _start(rt: Runtime, job_id: str) -> Background:
    bg = Background(threading.Thread(target=lambda: None))

    def go() -> None:
        try:
            bg.found.append(service.run(rt, job_id))
        except BaseException as exc:
            bg.raised.append(exc)

    bg.thread = threading.Thread(target=go, daemon=True)
    bg.thread.start()
    return bg


def _take_over(rt: Runtime, job_id: str) -> None:
    """The lease of the first run expires (as seen by the sweep): the job is sent again."""
    later = datetime.now(UTC) + job_lease(rt.settings) + timedelta(seconds=1)
    assert requeue_stale_jobs(rt, now=later, queued_after=timedelta(hours=1)) == 1


def _returns() -> None:
    return None


def _retryable() -> None:
    raise ExternalServiceError("the facilitator timed out", retryable=True)


def _refused() -> None:
    raise NotFound("the payment to act on is gone")


STALE_ENDINGS: dict[str, Callable[[], None]] = {
    "outcome": _returns,  # the final write: succeeded
    "queued_reset": _retryable,  # a retryable error: back to queued, the task retries
    "failure": _refused,  # a refusal: failed
}


@pytest.fixture
def hold(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[], None], bool], Held]]:
    made: list[Held] = []

    def make(then: Callable[[], None], hold_second: bool) -> Held:
        held = Held(then, hold_second=hold_second)
        _install(monkeypatch, held)
        made.append(held)
        return held

    yield make
    for held in made:  # never leave a thread waiting
        held.release.set()
        held.second_release.set()


@pytest.mark.parametrize("ending", sorted(STALE_ENDINGS))
def test_a_stale_run_ending_after_the_new_run_finished_leaves_its_outcome(
    api: ApiHarness,
    connection_id: str,
    hold: Callable[[Callable[[], None], bool], Held],
    ending: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = api.runtime
    job_id = _job(rt.engine, connection_id, "receive", {"amount": "1000"}, datetime.now(UTC))
    held = hold(STALE_ENDINGS[ending], False)
    first = _start(rt, job_id)
    assert held.entered.wait(60)

    _take_over(rt, job_id)
    second = service.run(rt, job_id)
    assert second.status == "succeeded" and second.result is not None
    done = _row(rt.engine, job_id)
    assert (done.status, done.attempts) == ("succeeded", 2)

    held.release.set()
    first.join()
    assert first.raised == []  # refused writes are not the task's failure: no retry either
    assert first.found == [outcome.Outcome("succeeded", second.result, None)]
    after = _row(rt.engine, job_id)
    assert (after.status, after.result, after.error, after.attempts) == (
        "succeeded",
        second.result,
        None,
        2,
    )
    assert held.ran == [1, 2]
    warned = [r for r in caplog.records if r.getMessage().startswith("job taken over")]
    assert [(r.levelname, r.__dict__.get("job_id")) for r in warned] == [("WARNING", job_id)]
    assert (warned[0].__dict__["claim_attempts"], warned[0].__dict__["row_attempts"]) == (1, 2)


@pytest.mark.parametrize("ending", sorted(STALE_ENDINGS))
def test_a_stale_run_ending_while_the_new_run_works_leaves_the_job_running(
    api: ApiHarness,
    connection_id: str,
    hold: Callable[[Callable[[], None], bool], Held],
    ending: str,
) -> None:
    rt = api.runtime
    job_id = _job(rt.engine, connection_id, "receive", {"amount": "1000"}, datetime.now(UTC))
    held = hold(STALE_ENDINGS[ending], True)
    first = _start(rt, job_id)
    assert held.entered.wait(60)
    _take_over(rt, job_id)
    second = _start(rt, job_id)
    assert held.second_entered.wait(60)

    held.release.set()
    first.join()
    assert first.raised == []
    assert [f.status for f in first.found] == ["running"]  # what the row says: another run's
    during = _row(rt.engine, job_id)
    assert (during.status, during.attempts, during.result) == ("running", 2, None)

    held.second_release.set()
    second.join()
    assert second.raised == [] and [f.status for f in second.found] == ["succeeded"]
    after = _row(rt.engine, job_id)
    assert (after.status, after.attempts, after.result) == ("succeeded", 2, second.found[0].result)


def test_a_stale_runs_unexpected_error_is_not_recorded_but_still_raised(
    api: ApiHarness,
    connection_id: str,
    hold: Callable[[Callable[[], None], bool], Held],
) -> None:
    """A bug in the stale run is still the task's failure (its traceback reported), but the
    ``internal_error`` requeue does not touch a job another run has finished."""

    def bug() -> None:
        raise RuntimeError("a bug")

    rt = api.runtime
    job_id = _job(rt.engine, connection_id, "receive", {"amount": "1000"}, datetime.now(UTC))
    held = hold(bug, False)
    first = _start(rt, job_id)
    assert held.entered.wait(60)
    _take_over(rt, job_id)
    second = service.run(rt, job_id)
    assert second.status == "succeeded"

    held.release.set()
    first.join()
    assert [type(e) for e in first.raised] == [RuntimeError]
    after = _row(rt.engine, job_id)
    assert (after.status, after.result, after.error, after.attempts) == (
        "succeeded",
        second.result,
        None,
        2,
    )


# ------------------------------------------------------- a direct send on the fault rig


@pytest.mark.chain
@pytest.mark.postgres
def test_a_stale_send_settles_its_payment_but_leaves_the_job_to_the_new_run(
    rig: FaultRig, accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run signs and is held before it settles; the sweep sends the job again and a
    second run takes it over and is held before its own settlement attempt. The first run then
    settles: the payment's final state commits (that is what happened on-chain), but the job's
    outcome written with it is refused — the job stays the second run's, ``running``. The
    second run then finds the payment settled and reports it; the money moved once."""
    from connector.payments import send

    conn = rig.connection(accounts[6])
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "250"})
    real = send.attempt_send
    first_held, first_go = threading.Event(), threading.Event()
    second_held, second_go = threading.Event(), threading.Event()
    calls: list[bool] = []

    def held(rt: Runtime, ctx: Any, payment: Any, inp: Any, on_final: Any = None) -> Any:
        calls.append(on_final is not None)
        if len(calls) == 1:  # the first run, signed, about to settle with its job's outcome
            first_held.set()
            assert first_go.wait(60)
        elif len(calls) == 2:  # the second run, resuming the stored authorization
            second_held.set()
            assert second_go.wait(60)
        return real(rt, ctx, payment, inp, on_final)

    monkeypatch.setattr(send, "attempt_send", held)
    try:
        first = _start(rig.rt, job)
        assert first_held.wait(60)
        payment_id = rig.job_row(job).payment_id
        assert payment_id is not None
        _take_over(rig.rt, job)
        second = _start(rig.rt, job)
        assert second_held.wait(60)

        first_go.set()
        first.join()
        assert first.raised == [] and [f.status for f in first.found] == ["running"]
        assert rig.payment(payment_id).state == "settled"
        during = rig.job_row(job)
        assert (during.status, during.attempts, during.result) == ("running", 2, None)
    finally:
        first_go.set()
        second_go.set()
    second.join()
    assert second.raised == [], second.raised
    assert [f.status for f in second.found] == ["succeeded"]
    after = rig.job_row(job)
    assert (after.status, after.attempts, after.payment_id) == ("succeeded", 2, payment_id)
    assert after.result is not None and after.result["payment"]["state"] == "settled"
    assert money_invariants(rig) == []


@pytest.mark.chain
@pytest.mark.postgres
def test_a_stale_send_creates_no_payment_for_a_job_another_run_holds(
    rig: FaultRig, accounts: list[LocalAccount], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send whose token domain is not cached yet commits its claim, then reads the chain
    before it signs. The first run is held there; a second run takes the job over and is held
    at the same point. The first run then signs, but its payment's link to the job is refused:
    its transaction (payment, budget reservation, signature) rolls back and it stops. The
    second run makes the job's one payment."""
    from connector.payments import protocol

    conn = rig.connection(accounts[6])
    job = rig.job(conn, "send", {"to": accounts[12].address, "amount": "150"})
    real = protocol.direct_requirement
    first_held, first_go = threading.Event(), threading.Event()
    second_held, second_go = threading.Event(), threading.Event()
    calls: list[int] = []

    def held(rt: Runtime, ctx: Any, inp: Any) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            first_held.set()
            assert first_go.wait(60)
        elif len(calls) == 2:
            second_held.set()
            assert second_go.wait(60)
        return real(rt, ctx, inp)

    monkeypatch.setattr(protocol, "direct_requirement", held)
    try:
        first = _start(rig.rt, job)
        assert first_held.wait(60)
        assert rig.job_row(job).status == "running"  # the claim committed before the read
        _take_over(rig.rt, job)
        second = _start(rig.rt, job)
        assert second_held.wait(60)

        first_go.set()
        first.join()
        assert first.raised == [] and [f.status for f in first.found] == ["running"]
        during = rig.job_row(job)
        assert (during.status, during.attempts, during.payment_id) == ("running", 2, None)
        assert _payments_keyed(rig, job) == []  # the stale run's payment never committed
    finally:
        first_go.set()
        second_go.set()
    second.join()
    assert second.raised == [], second.raised
    assert [f.status for f in second.found] == ["succeeded"]
    after = rig.job_row(job)
    assert (after.status, after.attempts) == ("succeeded", 2)
    assert _payments_keyed(rig, job) == [(after.payment_id, "settled")]
    assert money_invariants(rig) == []


def _payments_keyed(rig: FaultRig, job_id: str) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from connector.storage.models.payments import Payment

    with transaction(rig.rt.engine) as s:
        rows = s.execute(select(Payment).where(Payment.idempotency_key == job_id)).scalars()
        return [(p.id, p.state) for p in rows]
