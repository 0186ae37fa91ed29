"""Action jobs and the ``Idempotency-Key`` contract of the action API.

Semantics follow the IETF Idempotency-Key draft:

* first request with a key: a job is created and the key remembered (at least 24 h);
* same key, same body, first request finished: the same job is returned (no second action);
* same key, same body, first request still being answered: :class:`IdempotencyInFlight` (409);
* same key, different body: :class:`IdempotencyMismatch` (422).

Keys are scoped per connection and action, so two customers can never collide.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, SQLModel, col

from connector.errors import Conflict, ConnectorError, NotFound
from connector.ids import new_id
from connector.settings import Settings
from connector.storage.models.payments import IdempotencyRecord, Job

IN_FLIGHT_LEASE = timedelta(minutes=5)
JOBS: Table = SQLModel.metadata.tables["jobs"]
KEYS: Table = SQLModel.metadata.tables["idempotency_records"]
#: Claim an idempotency key unless it exists (per dialect: both spell ON CONFLICT DO NOTHING).
_INSERT_KEY = {
    name: dialect_insert(KEYS)
    .on_conflict_do_nothing(index_elements=["scope", "key"])
    .returning(KEYS.c.id)
    for name, dialect_insert in (("postgresql", pg_insert), ("sqlite", sqlite_insert))
}


class IdempotencyInFlight(Conflict):
    code = "idempotency_in_flight"
    title = "A request with this Idempotency-Key is still in flight"


class IdempotencyMismatch(ConnectorError):
    code = "idempotency_key_reused"
    status = 422
    title = "Idempotency-Key reused with a different request"


class IdempotencyKeyRequired(ConnectorError):
    """A money-moving action without a key could pay twice when its caller retries."""

    code = "idempotency_key_required"
    status = 428
    title = "An idempotency key is required for an action that moves money"


#: Headers that form an action node's natural idempotency key (a workflow run's node, and the
#: item when the node runs once per item of a list). Used when no Idempotency-Key is given.
NATURAL_KEY_HEADERS = ("X-Workflow-Run-Id", "X-Workflow-Node-Id", "X-Workflow-Item")


def natural_key(run_id: str | None, node_id: str | None, item: str | None = None) -> str | None:
    """The idempotency key of one execution of one workflow node: ``wf:<run>:<node>[:<item>]``.

    Both the run and the node are needed: the same node in another run, or another node of the
    same run, is another payment.
    """
    if not run_id or not node_id:
        return None
    parts = ["wf", run_id, node_id] + ([item] if item else [])
    return ":".join(p.replace(":", "%3A") for p in parts)[:255]


def require_key(action: str, idempotency_key: str | None) -> None:
    """Refuse a money-moving action that carries no idempotency key (nothing is created)."""
    from connector.actions.registry import BY_KEY

    spec = BY_KEY.get(action)
    if idempotency_key is None and spec is not None and spec.moves_money:
        raise IdempotencyKeyRequired(
            f"`{action}` moves money: send an Idempotency-Key header, or the action node's "
            "natural key (X-Workflow-Run-Id and X-Workflow-Node-Id headers), so that a retried "
            "call can never pay twice",
            field="Idempotency-Key",
        )


def request_fingerprint(action: str, body: Any) -> str:
    canonical = json.dumps({"action": action, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class JobStart:
    job: Job
    created: bool  # False when an earlier request with the same key already made this job
    idempotency_record_id: str | None


def start_job(
    session: Session,
    *,
    connection_id: str,
    action: str,
    body: dict[str, Any],
    idempotency_key: str | None,
    ttl: timedelta = timedelta(hours=48),
    now: datetime | None = None,
    requested_by: str | None = None,
) -> JobStart:
    """Create a job, or return the one an earlier request with the same key created.

    Money-moving actions need a key (:class:`IdempotencyKeyRequired`, 428).
    """
    require_key(action, idempotency_key)
    now = now or datetime.now(UTC)
    if idempotency_key is None:
        job = _new_job(session, connection_id, action, body, now, requested_by)
        return JobStart(job, True, None)
    scope = f"{connection_id}:{action}"
    fingerprint = request_fingerprint(action, body)
    for _ in range(2):
        job = _new_job(session, connection_id, action, body, now, requested_by)
        # The key is claimed by the insert itself: a new key (the common case) costs this one
        # statement, with no lookup before it and no savepoint around it. A key that exists
        # (or a concurrent request holding it) makes the insert a no-op, answered as a replay.
        record_id = new_id("idem")
        inserted = session.execute(
            _INSERT_KEY[session.get_bind().dialect.name],
            {
                "id": record_id,
                "scope": scope,
                "key": idempotency_key,
                "request_hash": fingerprint,
                "job_id": job.id,
                "in_flight": True,
                "lease_until": now + IN_FLIGHT_LEASE,
                "created_at": now,
                "expires_at": now + ttl,
            },
        ).first()
        if inserted is not None:
            return JobStart(job, True, record_id)
        # Our job row is in this transaction and must go, or the caller's commit would leave a
        # queued job that the stale-job sweep would run.
        session.execute(delete(JOBS).where(JOBS.c.id == job.id))
        existing = _live_record(session, scope, idempotency_key, now)
        if existing is not None:
            return _replay(session, existing, fingerprint, now)
        # The key had expired (its record is gone now): claim it afresh, once.
    raise Conflict("the Idempotency-Key is being reused concurrently; retry")


def _new_job(
    session: Session,
    connection_id: str,
    action: str,
    body: dict[str, Any],
    now: datetime,
    requested_by: str | None = None,
) -> Job:
    job = Job(
        id=new_id("job"),
        connection_id=connection_id,
        action=action,
        status="queued",
        input=body,
        requested_by=requested_by,
        created_at=now,
        updated_at=now,
    )
    # A plain INSERT: the job is returned to the caller, nothing in this transaction reads it back
    # through the ORM, and a batch of jobs then costs one round trip each instead of a flush each.
    session.execute(
        _INSERT_JOB,
        {
            "id": job.id,
            "connection_id": connection_id,
            "action": action,
            "status": "queued",
            "input": body,
            "attempts": 0,
            "requested_by": requested_by,
            "created_at": now,
            "updated_at": now,
        },
    )
    return job


def _live_record(session: Session, scope: str, key: str, now: datetime) -> IdempotencyRecord | None:
    record = session.execute(
        select(IdempotencyRecord).where(
            col(IdempotencyRecord.scope) == scope, col(IdempotencyRecord.key) == key
        )
    ).scalar_one_or_none()
    if record is not None and record.expires_at <= now:
        session.delete(record)
        session.flush()
        return None
    return record


def _replay(
    session: Session, record: IdempotencyRecord, fingerprint: str, now: datetime
) -> JobStart:
    if record.request_hash != fingerprint:
        raise IdempotencyMismatch(
            "this Idempotency-Key was first used with a different request body",
            field="Idempotency-Key",
        )
    if record.in_flight and record.lease_until > now:
        raise IdempotencyInFlight(
            "the first request with this Idempotency-Key is still being processed; retry later"
        )
    job = session.get(Job, record.job_id)
    if job is None:
        raise NotFound(f"job {record.job_id} of this Idempotency-Key no longer exists")
    return JobStart(job, False, record.id)


def finish_request(session: Session, record_id: str | None) -> None:
    """The HTTP request that owns the key has been answered: repeats may now replay it."""
    if record_id is not None:
        session.execute(
            update(IdempotencyRecord)
            .where(col(IdempotencyRecord.id) == record_id)
            .values(in_flight=False)
        )


def purge_expired(session: Session, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    result = session.execute(
        delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) <= now)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs of a job it is about to run (read in the same statement as the claim)."""

    id: str
    connection_id: str
    action: str
    input: dict[str, Any] | None
    payment_id: str | None
    attempts: int


FINISHED = ("succeeded", "failed")
RUNNING = "running"
#: How much longer than the task time limit a claim holds a running job: the time a worker may
#: still need to write its outcome after the limit, and clock skew between workers.
LEASE_MARGIN = timedelta(seconds=30)


def job_lease(settings: Settings) -> timedelta:
    """How long a claim holds a ``running`` job against every other delivery of its task.

    A task cannot run longer than the task time limit, so a job still ``running`` past the
    limit and this margin lost its worker: the next claim may take it over, and the stale-job
    sweep sends it again. The one definition both use.
    """
    return timedelta(seconds=settings.task_time_limit_s) + LEASE_MARGIN


@dataclass
class Handover:
    """The claim a task run holds on its job, handed to the task's own retry.

    ``attempts`` is the job's attempt number after this run's claim, set once that claim is
    committed (the row then says ``running`` with it). The retry passes it back to
    :func:`claim_job`, which lets it take over the job it still holds — after a dropped database
    connection the row may not have been put back in the queue. A claim increments the number, so
    the token is good for one claim only, and a claim that never committed leaves the token of
    the claim before it (a number the row may hold under another worker's claim is never sent).
    """

    attempts: int | None = None


# One statement on the hot path: the lease is part of the claim's WHERE, not a read before it.
_CLAIM = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("b_id"),
        JOBS.c.status.not_in(FINISHED),
        or_(
            JOBS.c.status != RUNNING,  # queued, or waiting on its payment
            JOBS.c.updated_at <= bindparam("b_expired"),  # its worker died: the lease expired
            JOBS.c.attempts == bindparam("b_handover"),  # the retry of the claim holding it
        ),
    )
    .values(status=RUNNING, attempts=JOBS.c.attempts + 1, updated_at=bindparam("b_now"))
    .returning(
        JOBS.c.id,
        JOBS.c.connection_id,
        JOBS.c.action,
        JOBS.c.input,
        JOBS.c.payment_id,
        JOBS.c.attempts,
    )
)
_UPDATE_JOB = update(JOBS).where(JOBS.c.id == bindparam("b_id"))
#: A run's own write to its job: only while the row still carries that run's claim (the fence is
#: part of the write's WHERE: the same single statement, no read before it).
_UPDATE_CLAIMED = _UPDATE_JOB.where(JOBS.c.attempts == bindparam("b_claim"))
_INSERT_JOB = insert(JOBS)


def update_job(session: Session, job_id: str, values: dict[str, Any], claim: int | None) -> bool:
    """Write ``values`` to a job row; whether the row was written.

    ``claim``: the attempt number of the run that writes (:attr:`ClaimedJob.attempts`). A run
    writes to its job only while no later claim took the job over: a run that outlived its lease
    (the ``threads`` and ``solo`` pools do not enforce the task time limit) and whose job the
    stale-job sweep sent to another worker must neither overwrite that run's outcome nor put the
    job it runs back in the queue. Its write is refused (False). ``None``: not a run's write (a
    job following its payment, from approvals or the reconciler): unfenced.
    """
    if claim is None:
        result = session.execute(_UPDATE_JOB, {**values, "b_id": job_id})
    else:
        result = session.execute(_UPDATE_CLAIMED, {**values, "b_id": job_id, "b_claim": claim})
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


class JobTakenOver(Exception):
    """A run's write to its job was refused: a later claim took the job over (see
    :func:`update_job`). Raised only once the run may stop: the transaction of the refused write
    was rolled back (a payment not created), or the money it had to record committed without it
    (a send's final payment state). The newer run does the work and records the outcome."""

    def __init__(self, job_id: str, claim: int) -> None:
        super().__init__(f"job {job_id} was taken over by a claim after attempt {claim}")
        self.job_id = job_id
        self.claim = claim


def link_payment(
    session: Session, job_id: str, payment_id: str, *, claim: int | None = None
) -> bool:
    """Record which payment a job made (in the transaction that creates the payment); whether it
    was recorded (``claim``: the run's attempt number, see :func:`update_job`)."""
    return update_job(session, job_id, {"payment_id": payment_id}, claim)


def claim_job(
    session: Session,
    job_id: str,
    now: datetime | None = None,
    *,
    lease: timedelta,
    handover: int | None = None,
) -> ClaimedJob | Job:
    """Mark a job running and count the attempt, in one statement.

    Claimed: a job that is queued or waiting on its payment; a ``running`` one whose claim is
    older than ``lease`` (see :func:`job_lease`); or a ``running`` one whose attempt number is
    ``handover`` (the retry of the task that claimed it, see :class:`Handover`).

    Otherwise returns the stored :class:`Job`: finished (its result stands; a redelivered task
    must not run the action again), or running under another worker's live claim (this
    delivery must leave it alone).
    """
    now = now or datetime.now(UTC)
    row = session.execute(
        _CLAIM,
        {"b_id": job_id, "b_now": now, "b_expired": now - lease, "b_handover": handover},
    ).first()
    if row is None:
        return get_job(session, job_id)
    return ClaimedJob(*row)


def set_job_status(
    session: Session,
    job_id: str,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    claim: int | None = None,
) -> bool:
    """Set a job's status; whether it was set (``claim``: the writing run's attempt number, see
    :func:`update_job`)."""
    values: dict[str, Any] = {"status": status, "updated_at": datetime.now(UTC)}
    if result is not None:
        values["result"] = result
    if error is not None:
        values["error"] = error
    return update_job(session, job_id, values, claim)
