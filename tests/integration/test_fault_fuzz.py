"""Issue 10 acceptance: a seeded randomized run that interleaves sends, paywall payments and
refunds with faults, then checks the money invariants.

Each step runs one to three actions concurrently on worker threads (as a worker's thread pool
does) while the main thread may inject a fault at a random moment:

* paused mining (anvil ``evm_setAutomine false``) and resumed mining;
* a facilitator outage: the server is stopped, later a fresh one starts on the same port (its
  settle cache is gone, like a restarted process);
* a dropped database connection (``pg_terminate_backend`` of the database's backends), either at
  a random moment or just before a chosen statement of a running action;
* a simulated worker crash: an action dies just before a chosen statement (nothing after it
  runs, its transaction never commits), as if the process were killed there.

An action that fails retryably, loses its connection or crashes stays unfinished and is run
again later (what Celery's retry, redelivery and beat's ``requeue_stale_jobs`` do), and reconcile
runs now and then. A job's retry carries the claim of the run it retries (the task's handover);
a crashed run's job stays ``running`` under its lease until the heal phase's sweep, as a dead
worker's job does until its lease expires. At the end every fault is healed, unfinished work is
retried and reconciled until nothing is in flight, and the invariants must hold: every payment's
state matches the chain, no failed payment moved money, every finished job agrees with its
payment, refunds never exceed what was paid, the budget was never overspent, and the payee's
on-chain balance moved by exactly the settled payments.

Bounded: at most ``STEPS`` steps or ``STEP_BUDGET_S`` seconds of steps, then the heal phase.
``X402C_FAULT_SEED`` replays a run.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import event, select

from connector.actions.service import run as run_action
from connector.errors import ConcurrentUpdate, ExternalServiceError
from connector.jobs import Handover, job_lease
from connector.payments import maintenance
from connector.payments.driver import drive
from connector.storage.db import CONNECTION_ERRORS, transaction
from connector.storage.models.payments import Job, Payment, Refund
from tests.fixtures.faults import FaultRig, money_invariants

pytestmark = [pytest.mark.chain, pytest.mark.postgres, pytest.mark.slow]

STEPS = 24
STEP_BUDGET_S = 35.0
BUDGET = 1500
# Seed 1 and 2 both fail on the code before the fix (a failed payment whose money moved).
SEED = int(os.environ.get("X402C_FAULT_SEED", "1"))
STATEMENTS = ("UPDATE payments", "INSERT INTO payments", "UPDATE jobs", "INSERT INTO events")


class Crash(BaseException):
    """A simulated kill of the worker at this point: not an Exception, nothing handles it."""


class Faults:
    """Statement-level faults armed for one worker thread's next action."""

    def __init__(self, rig: FaultRig) -> None:
        self.rig = rig
        self.armed: dict[int, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.fired: list[str] = []
        event.listen(rig.rt.engine, "before_cursor_execute", self._hook)

    def close(self) -> None:
        event.remove(self.rig.rt.engine, "before_cursor_execute", self._hook)

    def arm(self, kind: str, statement: str) -> None:
        with self.lock:
            self.armed[threading.get_ident()] = (kind, statement)

    def disarm(self) -> None:
        with self.lock:
            self.armed.pop(threading.get_ident(), None)

    def _hook(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with self.lock:
            armed = self.armed.get(threading.get_ident())
            if armed is None or armed[1] not in statement:
                return
            del self.armed[threading.get_ident()]
            self.fired.append(f"{armed[0]} before {armed[1]}")
        if armed[0] == "crash":
            raise Crash(armed[1])
        self.rig.drop_db_connections()


def as_a_task(fn: Any, *args: Any) -> str:
    """Run like a Celery task would: a retryable error, a lost connection or a crash leaves the
    work unfinished for a later run; anything else is a bug and fails the test."""
    try:
        fn(*args)
        return "done"
    except ExternalServiceError as exc:
        if not exc.retryable:
            raise
        return "retry"
    except ConcurrentUpdate:
        return "retry"  # lost a race: Celery retries it (workers/tasks.py RETRYABLE)
    except CONNECTION_ERRORS:
        return "db"
    except Crash:
        return "crash"


@pytest.mark.timeout(240)
def test_randomized_faults_never_lose_or_double_money(
    rig: FaultRig, accounts: list[LocalAccount]
) -> None:
    from connector.actions.schemas import ReceiveInput
    from connector.payments import protocol as proto
    from connector.payments import receive
    from connector.payments.context_loader import load_connection
    from connector.x402 import exact_evm as exact
    from connector.x402.codec import build_payment_payload

    rnd = random.Random(SEED)
    payee = accounts[11].address
    payer_conn = rig.connection(accounts[5], {"budget_day": str(BUDGET)})
    seller_conn = rig.connection(accounts[8])
    seller_ctx = load_connection(rig.rt, seller_conn)
    payee_before = rig.client.token_balance(rig.chain.token, payee)
    faults = Faults(rig)
    paywall_tries: list[tuple[str, dict[str, str]]] = []
    jobs: list[str] = []
    log: list[str] = []
    handovers: dict[str, Handover] = {}

    def run_job(job: str) -> None:
        """One task run of ``job``: a retry carries the claim of the run it retries, as
        workers/tasks.py does; a crashed worker's handover dies with it."""
        handover = handovers.pop(job, Handover())
        if as_a_task(run_action, rig.rt, job, handover) in ("retry", "db"):
            handovers[job] = handover

    def send(r: random.Random) -> None:
        job = rig.job(payer_conn, "send", {"to": payee, "amount": str(r.randint(50, 400))})
        jobs.append(job)
        run_job(job)

    def pay_paywall(r: random.Random) -> None:
        request = receive.create_request(
            rig.rt, seller_ctx, ReceiveInput.model_validate({"amount": str(r.randint(100, 900))})
        )
        requirement = receive._requirement(rig.rt, request)
        wire = build_payment_payload(
            exact.sign_exact(accounts[4], requirement).payload, requirement, 2
        )
        name, value = proto.payment_header(2, wire)
        paywall_tries.append((request.id, {name: value}))
        as_a_task(receive.handle_paywall, rig.rt, seller_ctx, request.id, {name: value})

    def refund(r: random.Random) -> None:
        with transaction(rig.rt.engine) as s:
            paid = [
                p.id
                for p in s.execute(
                    select(Payment).where(
                        Payment.direction == "incoming",
                        Payment.state.in_(("settled", "partially_refunded")),  # type: ignore[attr-defined]
                    )
                ).scalars()
            ]
        if not paid:
            return
        body: dict[str, Any] = {"payment_id": r.choice(paid)}
        if r.random() < 0.6:
            body["amount"] = str(r.randint(1, 200))
        job = rig.job(seller_conn, "refund", body)
        jobs.append(job)
        run_job(job)

    def retry_one(r: random.Random) -> None:
        unfinished = [j for j in jobs if rig.job_row(j).status not in ("succeeded", "failed")]
        if unfinished:
            run_job(r.choice(unfinished))

    def reconcile(r: random.Random) -> None:
        as_a_task(maintenance.reconcile, rig.rt, datetime.now(UTC) + timedelta(minutes=2))
        drain_dispatched()

    def drain_dispatched() -> None:
        while rig.dispatched:
            task, args = rig.dispatched.pop()
            if task == "x402c.drive_payment":
                as_a_task(drive, rig.rt, args[0])

    actions = [send, send, send, pay_paywall, refund, refund, retry_one, reconcile]

    def worker(action: Any, fault: tuple[str, str] | None, seed: int) -> None:
        if fault is not None:
            faults.arm(*fault)
        try:
            action(random.Random(seed))
        except CONNECTION_ERRORS:
            pass  # the test's own bookkeeping lost its connection: a client would retry
        finally:
            faults.disarm()

    mining = True
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        for step in range(STEPS):
            if time.monotonic() - started > STEP_BUDGET_S:
                break
            chosen = [rnd.choice(actions) for _ in range(rnd.randint(1, 3))]
            statement_faults = [
                (rnd.choice(("crash", "db")), rnd.choice(STATEMENTS))
                if rnd.random() < 0.3
                else None
                for _ in chosen
            ]
            futures = [
                pool.submit(worker, a, f, rnd.getrandbits(32))
                for a, f in zip(chosen, statement_faults, strict=True)
            ]
            roll = rnd.random()
            time.sleep(rnd.uniform(0, 0.3))
            if roll < 0.2:
                mining = not mining
                rig.resume_mining() if mining else rig.pause_mining()
                log.append(f"{step}: mining {'on' if mining else 'off'}")
            elif roll < 0.35:
                if rig.server is None:
                    rig.facilitator_up()
                    log.append(f"{step}: facilitator up")
                else:
                    rig.facilitator_down()
                    log.append(f"{step}: facilitator down")
            elif roll < 0.45:
                rig.drop_db_connections()
                log.append(f"{step}: db connections dropped")
            for future in futures:
                future.result(timeout=120)
            log.append(f"{step}: ran {[a.__name__ for a in chosen]}")

    # Heal: every fault ends; unfinished work runs again and reconcile decides the rest.
    faults.close()
    rig.resume_mining()
    if rig.server is None:
        rig.facilitator_up()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # no worker runs any more: every lease has expired by the sweep's clock (beat's sweep
        # puts the jobs of crashed runs back in the queue)
        maintenance.requeue_stale_jobs(
            rig.rt, datetime.now(UTC) + job_lease(rig.rt.settings) + timedelta(seconds=1)
        )
        with transaction(rig.rt.engine) as s:
            unfinished = list(
                s.execute(
                    select(Job.id).where(Job.status.not_in(("succeeded", "failed")))  # type: ignore[attr-defined]
                ).scalars()
            )
        for job in unfinished:  # every job in the database, tracked or not
            run_job(job)
        for request_id, header in paywall_tries:  # payers retry with the same payment
            as_a_task(receive.handle_paywall, rig.rt, seller_ctx, request_id, header)
        reconcile(rnd)
        if not money_invariants(rig, {payer_conn: BUDGET}):
            break
        time.sleep(0.5)

    context = f"seed={SEED} faults={faults.fired} log={log}"
    assert money_invariants(rig, {payer_conn: BUDGET}) == [], context
    with transaction(rig.rt.engine) as s:
        payments = list(s.execute(select(Payment)).scalars())
        refunds = list(s.execute(select(Refund)).scalars())
        finished = list(s.execute(select(Job).where(Job.status == "succeeded")).scalars())
    for p in payments:
        done = sum(r.amount for r in refunds if r.payment_id == p.id and r.state == "succeeded")
        assert done == p.refunded_amount <= p.amount, (p.id, done, p.refunded_amount, context)
    moved = sum(
        p.amount
        for p in payments
        if p.direction == "outgoing" and p.state == "settled" and p.payee == payee
    )
    assert rig.client.token_balance(rig.chain.token, payee) - payee_before == moved, context
    assert moved <= BUDGET
    print(
        context,
        "moved",
        moved,
        [(p.direction, p.state) for p in payments],
        [r.state for r in refunds],
    )
    # the run did exercise the rail: money moved and something was refused or refunded
    assert moved > 0 and finished, context
