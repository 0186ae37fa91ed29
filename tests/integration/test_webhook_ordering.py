"""A payment's events reach each subscriber in sequence order, at least once.

Deterministic cases run on SQLite and PostgreSQL; the stress case runs many payments through two
concurrent dispatchers on PostgreSQL against a receiver that fails at random (seeded).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

from connector.connections import service as connections
from connector.connections.schemas import ConnectionCreate
from connector.ids import new_id
from connector.payments.machine import Step, advance, insert_payment
from connector.payments.states import PaymentState as S
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import make_engine, transaction
from connector.storage.models.events import Delivery, Event
from connector.storage.models.payments import Payment
from connector.vault import MasterKeyRing
from connector.webhooks import dispatcher, subscriptions
from tests.fixtures.db import _truncate, create_schema
from tests.fixtures.servers import LiveServer

KEYS = MasterKeyRing.generate_spec("o1")


@dataclass
class Arrival:
    path: str
    payment_id: str
    sequence: int
    type: str
    status: int


@dataclass
class Receiver:
    """Records every request in arrival order; answers 503 where ``fails`` says so."""

    fails: Any = None  # (path, payment_id, sequence, attempt) -> bool
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{path}")
        async def hook(path: str, request: Request) -> Response:
            event = json.loads(await request.body())
            payment_id = event["data"]["payment"]["id"]
            with self.lock:
                attempt = 1 + sum(
                    1
                    for a in self.arrivals
                    if a.path == path
                    and a.payment_id == payment_id
                    and a.sequence == event["sequence"]
                )
                fail = self.fails is not None and self.fails(
                    path, payment_id, event["sequence"], attempt
                )
                status = 503 if fail else 204
                self.arrivals.append(
                    Arrival(path, payment_id, event["sequence"], event["type"], status)
                )
            return Response(status_code=status)

        return app

    def chains(self) -> dict[tuple[str, str], list[Arrival]]:
        out: dict[tuple[str, str], list[Arrival]] = defaultdict(list)
        for a in self.arrivals:
            out[(a.path, a.payment_id)].append(a)
        return out


def runtime_on(engine_url: str, tmp_path: Path) -> Runtime:
    settings = Settings(
        data_dir=tmp_path, master_keys=KEYS, webhook_allow_loopback=True, webhook_timeout_s=5
    )
    return Runtime(settings=settings, engine=make_engine(engine_url))


@pytest.fixture
def rt(engine: Engine, tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=tmp_path, master_keys=KEYS, webhook_allow_loopback=True, webhook_timeout_s=5
    )
    yield Runtime(settings=settings, engine=engine)


def make_connection(rt: Runtime, url: str) -> str:
    with transaction(rt.engine) as s:
        return connections.create(
            s,
            rt.vault,
            ConnectionCreate(
                name="ordered", network="base-sepolia", rpc_url="https://r.example",
                facilitator_url="https://f.example", webhook_url=url,
            ),
        ).id  # fmt: skip


def new_payment(conn_id: str) -> Payment:
    return Payment(
        id=new_id("pay"),
        connection_id=conn_id,
        direction="incoming",
        state="created",
        amount=10_000,
        asset="0x" + "1" * 40,
        network="eip155:31337",
        payee="0x" + "2" * 40,
    )


def create(
    rt: Runtime, conn_id: str, then: tuple[S, ...] = (), payment: Payment | None = None
) -> str:
    with transaction(rt.engine) as s:
        payment = payment or new_payment(conn_id)
        return insert_payment(s, payment, then=[Step(t) for t in then]).id


def move(rt: Runtime, payment_id: str, *targets: S) -> None:
    with transaction(rt.engine) as s:
        payment = s.get(Payment, payment_id)
        assert payment is not None
        advance(s, payment, [Step(t) for t in targets])


def delivered_in_order(arrivals: list[Arrival]) -> list[int]:
    return [a.sequence for a in arrivals if a.status < 300]


def test_a_payments_later_events_wait_for_a_failing_earlier_one(rt: Runtime) -> None:
    failing: set[str] = set()  # the first attempt of these payments' sequence 1 fails
    receiver = Receiver(
        fails=lambda _p, pid, seq, attempt: pid in failing and (seq, attempt) == (1, 1)
    )
    with LiveServer(receiver.app()) as server:
        conn_id = make_connection(rt, server.url + "/hook")
        slow = create(rt, conn_id, then=(S.AUTHORIZED, S.SETTLING))
        failing.add(slow)
        move(rt, slow, S.SETTLED)
        now = datetime.now(UTC)
        dispatcher.dispatch(rt, now=now)
        # Only sequence 1 was tried: 2..4 wait behind it, unsent, still pending.
        assert [(a.sequence, a.status) for a in receiver.arrivals] == [(1, 503)]
        with transaction(rt.engine) as s:
            rows = s.execute(select(Delivery).order_by(Delivery.sequence)).scalars().all()
            assert [(d.sequence, d.status, d.attempts) for d in rows] == [
                (1, "pending", 1), (2, "pending", 0), (3, "pending", 0), (4, "pending", 0),
            ]  # fmt: skip
        # Another payment is not held up by this one.
        other = create(rt, conn_id)
        dispatcher.dispatch(rt, now=now)
        assert receiver.chains()[("hook", other)][0].status == 204
        assert len(receiver.chains()[("hook", slow)]) == 1
        # Once sequence 1's retry is due, the whole chain goes, in order.
        dispatcher.dispatch(rt, now=now + timedelta(seconds=10))
    assert delivered_in_order(receiver.chains()[("hook", slow)]) == [1, 2, 3, 4]
    assert [a.type for a in receiver.chains()[("hook", slow)][1:]] == [
        "payment.created", "payment.authorized", "payment.settling", "payment.settled",
    ]  # fmt: skip


def test_a_permanently_failed_or_dead_delivery_does_not_block_the_rest(rt: Runtime) -> None:
    receiver = Receiver(fails=lambda _p, _id, seq, _a: seq == 1)  # sequence 1 always fails
    with LiveServer(receiver.app()) as server:
        conn_id = make_connection(rt, server.url + "/hook")
        payment_id = create(rt, conn_id, then=(S.AUTHORIZED,))
        now = datetime.now(UTC)
        for _ in range(dispatcher.http.MAX_ATTEMPTS + 1):
            dispatcher.dispatch(rt, now=now)
            with transaction(rt.engine) as s:
                head = s.execute(select(Delivery).where(Delivery.sequence == 1)).scalar_one()
            if head.status != "pending":
                break
            assert head.next_attempt_at is not None
            now = head.next_attempt_at
    assert head.status == "dead"
    seqs = [(a.sequence, a.status) for a in receiver.chains()[("hook", payment_id)]]
    assert seqs[-1] == (2, 204) and all(seq == 1 for seq, _ in seqs[:-1])


def test_an_event_not_yet_fanned_out_holds_back_the_later_ones(rt: Runtime) -> None:
    receiver = Receiver()
    with LiveServer(receiver.app()) as server:
        conn_id = make_connection(rt, server.url + "/hook")
        payment_id = create(rt, conn_id)
        move(rt, payment_id, S.AUTHORIZED)
        dispatcher.fan_out(rt)
        # As if another dispatcher were still fanning out sequence 1 (its transaction not yet
        # committed) while sequence 2 already has its delivery.
        with transaction(rt.engine) as s:
            s.execute(delete(Delivery).where(Delivery.sequence == 1))
            s.execute(update(Event).where(Event.sequence == 1).values(dispatched=False))
        assert dispatcher.deliver_due(rt) == 0
        assert receiver.arrivals == []
        dispatcher.dispatch(rt)
    assert delivered_in_order(receiver.chains()[("hook", payment_id)]) == [1, 2]


class SteppedClock:
    """The dispatchers' clock. It stands still while any dispatcher is in a round and jumps to
    the next due retry only when all are idle, so a lease never expires under a running round
    (as real time would not run 60 s ahead in a few milliseconds) and days of retries take
    seconds."""

    def __init__(self, dispatchers: int) -> None:
        self.now = datetime.now(UTC)
        self.gates = [threading.Lock() for _ in range(dispatchers)]
        self.idle = [False] * dispatchers

    def jump_to(self, when: datetime) -> None:
        for gate in self.gates:
            gate.acquire()
        try:
            self.now = max(self.now, when)
            self.idle = [False] * len(self.idle)
        finally:
            for gate in self.gates:
                gate.release()


def dispatcher_loop(
    rt: Runtime, clock: SteppedClock, index: int, stop: threading.Event, sent: list[int]
) -> None:
    while not stop.is_set():
        with clock.gates[index]:
            count = dispatcher.dispatch(rt, now=clock.now)
        sent[index] += count
        if count == 0:
            clock.idle[index] = True
            time.sleep(0.005)


@pytest.mark.slow
def test_many_payments_two_dispatchers_random_failures_order_holds_per_subscription(
    pg_database: str, tmp_path: Path
) -> None:
    rng_seed = 1206
    payments_n, writers, failure_rate = 60, 4, 0.3

    def fails(path: str, payment_id: str, seq: int, attempt: int) -> bool:
        draw = random.Random(f"{rng_seed}:{path}:{index_of[payment_id]}:{seq}:{attempt}")
        return draw.random() < failure_rate

    index_of: dict[str, int] = {}
    receiver = Receiver(fails=fails)
    setup = runtime_on(pg_database, tmp_path)
    create_schema(setup.engine)
    _truncate(setup.engine)
    dispatchers = [runtime_on(pg_database, tmp_path) for _ in range(2)]
    clock = SteppedClock(len(dispatchers))
    stop = threading.Event()
    sent = [0, 0]
    with LiveServer(receiver.app()) as server:
        conn_id = make_connection(setup, server.url + "/default")
        with transaction(setup.engine) as s:  # a second subscriber that takes only some types
            subscriptions.create(
                s,
                setup.vault,
                connection_id=None,
                url=server.url + "/extra",
                event_types=["payment.created", "payment.settling", "payment.settled"],
                allow_loopback=True,
            )
        loops = [
            threading.Thread(target=dispatcher_loop, args=(rt, clock, i, stop, sent))
            for i, rt in enumerate(dispatchers)
        ]
        for loop in loops:
            loop.start()
        try:
            # Payments move in steps, each its own transaction, on several writer threads, while
            # the dispatchers run: events of one payment are fanned out by either dispatcher.
            fresh = [new_payment(conn_id) for _ in range(payments_n)]
            ids = [p.id for p in fresh]
            index_of.update({pid: i for i, pid in enumerate(ids)})
            for i, payment in enumerate(fresh):
                create(setup, conn_id, (S.AUTHORIZED,) if i >= payments_n // 2 else (), payment)
            plan: list[list[tuple[str, list[S]]]] = [
                [(pid, [S.AUTHORIZED]) for pid in ids[: payments_n // 2]],
                [(pid, [S.SETTLING]) for pid in ids],
                [(pid, [S.SETTLED]) for pid in ids[::2]] + [(pid, [S.FAILED]) for pid in ids[1::2]],
            ]
            with ThreadPoolExecutor(writers) as pool:
                for wave in plan:
                    random.Random(rng_seed).shuffle(wave)
                    list(pool.map(lambda step: move(setup, step[0], *step[1]), wave))
            # Then let the retries run: jump the clock to the next due retry when all are idle.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if all(clock.idle):
                    with transaction(setup.engine) as s:
                        # (blocked followers are due already: the next retry is the
                        # earliest time still ahead)
                        later = func.min(Delivery.next_attempt_at).filter(
                            Delivery.next_attempt_at > clock.now
                        )
                        open_rows = s.execute(
                            select(func.count(), later).where(
                                Delivery.status.in_(("pending", "sending"))
                            )
                        ).one()
                        undispatched = s.execute(
                            select(func.count()).where(~Event.dispatched)
                        ).scalar_one()
                    if open_rows[0] == 0 and undispatched == 0:
                        break
                    if open_rows[1] is not None:
                        # (ten minutes on: retries of many chains come due together)
                        clock.jump_to(open_rows[1] + timedelta(minutes=10))
                time.sleep(0.01)
        finally:
            stop.set()
            for loop in loops:
                loop.join(30)
            for rt in dispatchers:
                rt.engine.dispose()
    with transaction(setup.engine) as s:
        events = s.execute(select(Event).where(Event.payment_id.is_not(None))).scalars().all()
        statuses = s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
    expected: dict[tuple[str, str], list[int]] = defaultdict(list)
    extra = {"payment.created", "payment.settling", "payment.settled"}
    for e in sorted(events, key=lambda e: (e.payment_id, e.sequence)):
        expected[("default", e.payment_id or "")].append(e.sequence or 0)
        if e.type in extra:
            expected[("extra", e.payment_id or "")].append(e.sequence or 0)
    chains = receiver.chains()
    assert set(chains) == set(expected)
    assert dict(statuses) == {"delivered": sum(len(want) for want in expected.values())}
    retried_behind = 0
    for chain, want in expected.items():
        arrivals = chains[chain]
        # Every event delivered (acknowledged) at least once, first deliveries in sequence order.
        firsts: list[int] = []
        for a in arrivals:
            if a.status < 300 and a.sequence not in firsts:
                firsts.append(a.sequence)
        assert firsts == want, chain
        # And nothing was even tried before every earlier event of its chain was acknowledged.
        acked: set[int] = set()
        for a in arrivals:
            assert all(earlier in acked for earlier in want if earlier < a.sequence), (chain, a)
            if a.status < 300:
                acked.add(a.sequence)
        if any(a.status >= 300 for a in arrivals[:-1]):
            retried_behind += 1
    # The run exercised what it claims: failures with later events queued behind them, both
    # dispatchers busy, and a payment's sequence numbers 1, 2, 3… without gaps.
    assert retried_behind > 10
    assert min(sent) > 0
    for pid in ids:
        assert expected[("default", pid)] == list(range(1, len(expected[("default", pid)]) + 1))
