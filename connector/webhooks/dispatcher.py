"""Outbox -> deliveries -> HTTP. Safe with any number of dispatchers running at once.

* :func:`fan_out` turns undispatched events into one Delivery per matching subscription.
* :func:`deliver_due` claims due deliveries with a conditional update (a lease), so two workers
  never send the same delivery at the same time; a worker that dies leaves a lease that expires
  and the delivery is picked up again (at least once).
* The clock is a parameter everywhere, so tests can run the whole three-day schedule in a blink.

Ordering. A payment's deliveries to one subscription form a *chain*, sent in ``sequence``
order: a delivery is sent only once every earlier one of its chain is finished (delivered,
failed or dead) and every earlier event of its payment has been fanned out. Only a chain's
*head* (its earliest unfinished delivery) can be claimed, and the claim takes the head's due
followers with it, so one dispatcher owns a whole chain while it sends it, one delivery after
another. Another dispatcher cannot see a follower as a head while the head is unfinished, so no
lock beyond the head's row is needed. Deliveries of different chains are sent concurrently.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import (
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, SQLModel, col

from connector.connections import service as connections
from connector.events.outbox import body_of, record_event
from connector.ids import new_id
from connector.logs import get_logger
from connector.metrics import WEBHOOK_ATTEMPTS
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import UnitOfWork
from connector.storage.models.connections import Connection
from connector.storage.models.events import Delivery, Event, Subscription
from connector.webhooks import delivery as http
from connector.webhooks import subscriptions

log = get_logger(__name__)
LEASE = timedelta(seconds=60)
#: At most this many deliveries of one chain per claim: the lease must cover sending them one
#: after another, each up to the webhook timeout.
MAX_CHAIN = 8
OPEN = ("pending", "sending")  # unfinished; everything else (delivered, failed, dead) is final

DELIVERIES: Table = SQLModel.metadata.tables["deliveries"]
EVENTS: Table = SQLModel.metadata.tables["events"]
ATTEMPTS: Table = SQLModel.metadata.tables["delivery_attempts"]


def fan_out(rt: Runtime, *, now: datetime | None = None, batch: int = 1000) -> int:
    """Undispatched events -> deliveries, in one transaction per batch."""
    now = now or datetime.now(UTC)
    with UnitOfWork(rt.engine) as uow:
        s = uow.session
        # Claim and mark a batch in one statement, reading back only what routing needs (not
        # the payloads). On PostgreSQL, rows another dispatcher is fanning out right now are
        # skipped rather than waited for and done twice. The deliveries are inserted in this
        # same transaction, so a crash undoes the marking too.
        batch_ids = select(col(Event.id)).where(~col(Event.dispatched)).order_by(col(Event.id))
        batch_ids = batch_ids.limit(batch)
        if s.get_bind().dialect.name == "postgresql":
            batch_ids = batch_ids.with_for_update(skip_locked=True)
        claimed = s.execute(
            update(Event)
            .where(col(Event.id).in_(batch_ids.scalar_subquery()))
            .values(dispatched=True)
            .returning(
                col(Event.id),
                col(Event.type),
                col(Event.connection_id),
                col(Event.payment_id),
                col(Event.sequence),
            )
            .execution_options(synchronize_session=False)
        ).all()
        events = sorted(claimed, key=lambda e: e.id)  # RETURNING has no order: keep event order
        if not events:
            uow.commit()
            return 0
        global_subs = list(
            s.execute(
                select(Subscription).where(col(Subscription.connection_id).is_(None))
            ).scalars()
        )
        per_connection: dict[str, list[Subscription]] = {}
        rows: list[dict[str, object]] = []
        for event in events:
            targets = list(global_subs)
            if event.connection_id:
                if event.connection_id not in per_connection:
                    per_connection[event.connection_id] = _connection_targets(
                        s, event.connection_id
                    )
                targets += per_connection[event.connection_id]
            rows += [
                {
                    "id": new_id("whd"),
                    "event_id": event.id,
                    "subscription_id": sub.id,
                    "payment_id": event.payment_id,
                    "sequence": event.sequence,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
                for sub in targets
                if subscriptions.matches(sub, event.type)
            ]
        if rows:
            # One statement compiled once and cached, run for every row (a DB-API executemany,
            # pipelined on PostgreSQL); inlining the rows as one multi-VALUES statement cost a
            # fresh compile of thousands of parameters per batch.
            postgres = s.get_bind().dialect.name == "postgresql"
            s.execute(_INSERT_DELIVERY_PG if postgres else _INSERT_DELIVERY_SQLITE, rows)
        uow.commit()
    return len(rows)


_INSERT_DELIVERY_PG = pg_insert(DELIVERIES).on_conflict_do_nothing(
    index_elements=["event_id", "subscription_id"]
)
_INSERT_DELIVERY_SQLITE = sqlite_insert(DELIVERIES).on_conflict_do_nothing(
    index_elements=["event_id", "subscription_id"]
)


def _connection_targets(s: Session, connection_id: str) -> list[Subscription]:
    targets: list[Subscription] = []
    conn = s.get(Connection, connection_id)
    if conn is not None and conn.webhook_url:
        targets.append(subscriptions.default_for(s, conn.id))
    targets += list(
        s.execute(
            select(Subscription).where(
                col(Subscription.connection_id) == connection_id, ~col(Subscription.is_default)
            )
        ).scalars()
    )
    return targets


@dataclass
class _Job:
    delivery_id: str
    event_id: str
    attempt: int
    url: str
    secrets: list[str]
    body: bytes
    subscription_id: str
    next_attempt_at: datetime | None


def _due(now: datetime) -> Any:
    d = DELIVERIES.c
    return or_(
        and_(d.status == "pending", d.next_attempt_at <= now),
        and_(d.status == "sending", d.lease_until < now),
    )


def _unfinished(status: Any) -> Any:
    # Literal values, not bound parameters: the planners (PostgreSQL's generic plans, SQLite)
    # use the partial index ix_deliveries_chain_open only when the condition matches its own.
    return status.in_([literal_column(f"'{value}'") for value in OPEN])


def _heads(limit: int, now: datetime, postgres: bool) -> Any:
    """Due deliveries that are the head of their chain (or belong to no payment)."""
    d = DELIVERIES.c
    prior = DELIVERIES.alias("prior")
    earlier = EVENTS.alias("earlier")
    unfinished_before = exists().where(
        prior.c.subscription_id == d.subscription_id,
        prior.c.payment_id == d.payment_id,
        prior.c.sequence < d.sequence,
        _unfinished(prior.c.status),
    )
    unrouted_before = exists().where(
        earlier.c.payment_id == d.payment_id,
        earlier.c.sequence < d.sequence,
        ~earlier.c.dispatched,
    )
    query = (
        select(d.id, d.subscription_id, d.payment_id, d.sequence)
        .where(_due(now), or_(d.payment_id.is_(None), and_(~unfinished_before, ~unrouted_before)))
        .order_by(d.next_attempt_at)
        .limit(limit)
    )
    if postgres:
        # Rows another dispatcher is claiming right now are skipped, not waited for.
        query = query.with_for_update(skip_locked=True, of=DELIVERIES)
    return query


def _followers(s: Session, heads: Sequence[Any], now: datetime) -> list[str]:
    """The due deliveries after each head in its chain, up to the first one that must wait."""
    chained = [h for h in heads if h.payment_id is not None]
    if not chained:
        return []
    d = DELIVERIES.c
    payment_ids = {h.payment_id for h in chained}
    rows = s.execute(
        select(d.id, d.subscription_id, d.payment_id, d.sequence, _due(now).label("due"))
        .where(
            d.payment_id.in_(payment_ids),
            d.subscription_id.in_({h.subscription_id for h in chained}),
            _unfinished(d.status),
        )
        .order_by(d.sequence)
    ).all()
    # The first event of each payment that is not fanned out yet: nothing from it on may go.
    unrouted = dict(
        s.execute(
            select(EVENTS.c.payment_id, func.min(EVENTS.c.sequence))
            .where(EVENTS.c.payment_id.in_(payment_ids), ~EVENTS.c.dispatched)
            .group_by(EVENTS.c.payment_id)
        ).all()
    )
    heads_by_chain = {(h.subscription_id, h.payment_id): h for h in chained}
    taken: dict[tuple[str, str], int] = {}
    stopped: set[tuple[str, str]] = set()
    out: list[str] = []
    for row in rows:
        chain = (row.subscription_id, row.payment_id)
        head = heads_by_chain.get(chain)
        if head is None or chain in stopped or row.sequence <= head.sequence:
            continue
        limit = unrouted.get(row.payment_id)
        if not row.due or (limit is not None and row.sequence > limit):
            stopped.add(chain)
            continue
        if taken.get(chain, 1) >= MAX_CHAIN:
            stopped.add(chain)
            continue
        taken[chain] = taken.get(chain, 1) + 1
        out.append(row.id)
    return out


def _claim(rt: Runtime, now: datetime, limit: int) -> tuple[str, list[list[_Job]]]:
    """Lease up to ``limit`` chains' due deliveries, then load what sending needs.

    Returns the lease owner and the chains: each a list of jobs to send one after another, in
    sequence order.
    """
    owner = secrets_token()
    d = DELIVERIES.c
    with UnitOfWork(rt.engine) as uow:
        s = uow.session
        postgres = s.get_bind().dialect.name == "postgresql"
        heads = s.execute(_heads(limit, now, postgres)).all()
        if not heads:
            uow.commit()
            return owner, []
        ids = [h.id for h in heads] + _followers(s, heads, now)
        rows = s.execute(
            update(DELIVERIES)
            .where(d.id.in_(ids), _due(now))
            .values(status="sending", lease_until=now + LEASE, lease_owner=owner, updated_at=now)
            .returning(
                d.id,
                d.event_id,
                d.subscription_id,
                d.payment_id,
                d.sequence,
                d.attempts,
                d.next_attempt_at,
            )
        ).all()
        uow.commit()
        if not rows:
            return owner, []
        events = {
            e.id: body_of(e.payload, e.sequence)
            for e in s.execute(
                select(EVENTS.c.id, EVENTS.c.payload, EVENTS.c.sequence).where(
                    EVENTS.c.id.in_({r.event_id for r in rows})
                )
            )
        }
        subs = {
            sub.id: sub
            for sub in s.execute(
                select(Subscription).where(
                    col(Subscription.id).in_({r.subscription_id for r in rows})
                )
            ).scalars()
        }
        targets: dict[str, tuple[str, list[str]] | str] = {}
        for sub in subs.values():
            targets[sub.id] = _target(rt, s, sub, now)
        chains: dict[tuple[str, str], list[tuple[int, _Job]]] = {}
        failed: list[tuple[str, str]] = []
        for row in sorted(rows, key=lambda r: (r.sequence or 0, r.id)):
            payload, target = events.get(row.event_id), targets.get(row.subscription_id)
            if payload is None or target is None or isinstance(target, str):
                failed.append((row.id, target if isinstance(target, str) else "missing event"))
                continue
            url, secret_list = target
            body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
            job = _Job(
                row.id,
                row.event_id,
                row.attempts + 1,
                url,
                secret_list,
                body,
                row.subscription_id,
                row.next_attempt_at,
            )
            key = (row.subscription_id, row.payment_id or row.id)
            chains.setdefault(key, []).append((row.sequence or 0, job))
        for delivery_id, reason in failed:
            s.execute(
                update(Delivery)
                .where(col(Delivery.id) == delivery_id, col(Delivery.lease_owner) == owner)
                .values(
                    status="failed", last_error=reason[:1000], lease_until=None, lease_owner=None
                )
            )
        uow.commit()
    ordered = [[job for _, job in sorted(chain, key=lambda x: x[0])] for chain in chains.values()]
    return owner, ordered


def secrets_token() -> str:
    import secrets

    return secrets.token_hex(12)


def _target(
    rt: Runtime, s: Session, sub: Subscription, now: datetime
) -> tuple[str, list[str]] | str:
    """(url, signing secrets) for a subscription, or why it cannot be sent to."""
    if sub.status != "active":
        return f"subscription {sub.status}"
    try:
        if sub.is_default:
            conn = connections.get(s, sub.connection_id or "")
            return conn.webhook_url or "", connections.webhook_secrets(rt.vault, conn, now)
        return sub.url, subscriptions.secrets_of(rt.vault, sub, now)
    except Exception as exc:
        return f"cannot prepare delivery: {getattr(exc, 'detail', exc)}"


# One UPDATE shape for every outcome, executed for a whole batch at once (a DB-API executemany:
# pipelined on PostgreSQL). Only the lease holder may write: a dispatcher that lost its lease
# (it stalled past it and another one took over) records nothing.
_RECORD = (
    update(DELIVERIES)
    .where(DELIVERIES.c.id == bindparam("b_id"), DELIVERIES.c.lease_owner == bindparam("b_owner"))
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        last_status_code=bindparam("b_code"),
        last_error=bindparam("b_error"),
        next_attempt_at=bindparam("b_next"),
        delivered_at=func.coalesce(bindparam("b_delivered"), DELIVERIES.c.delivered_at),
        lease_until=None,
        lease_owner=None,
        updated_at=bindparam("b_now"),
    )
)
# The common outcome, many deliveries answered alike (say 204): one statement for the group.
_RECORD_ALIKE = (
    update(DELIVERIES)
    .where(
        DELIVERIES.c.id.in_(bindparam("b_ids", expanding=True)),
        DELIVERIES.c.lease_owner == bindparam("b_owner"),
    )
    .values(
        status=bindparam("b_status"),
        attempts=DELIVERIES.c.attempts + 1,
        last_status_code=bindparam("b_code"),
        last_error=None,
        delivered_at=bindparam("b_delivered"),
        lease_until=None,
        lease_owner=None,
        updated_at=bindparam("b_now"),
    )
)
_RELEASE = (
    update(DELIVERIES)
    .where(DELIVERIES.c.id == bindparam("b_id"), DELIVERIES.c.lease_owner == bindparam("b_owner"))
    .values(status="pending", lease_until=None, lease_owner=None)
)
_INSERT_ATTEMPT = insert(ATTEMPTS)


def _record_all(
    rt: Runtime,
    results: list[tuple[_Job, http.Outcome]],
    unsent: list[_Job],
    now: datetime,
    owner: str,
) -> None:
    """Write every outcome of a batch in one transaction, and hand back what was not sent."""
    limit = timedelta(days=rt.settings.webhook_disable_after_days)
    with UnitOfWork(rt.engine) as uow:
        s = uow.session
        subs = {
            sub.id: sub
            for sub in s.execute(
                select(Subscription).where(
                    col(Subscription.id).in_({job.subscription_id for job, _ in results})
                )
            ).scalars()
        }
        attempts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        disable: list[tuple[Subscription, str]] = []
        for job, outcome in results:
            WEBHOOK_ATTEMPTS.labels(outcome=outcome.kind).inc()
            sub = subs[job.subscription_id]
            attempts.append(
                {
                    "id": new_id("wha"),
                    "delivery_id": job.delivery_id,
                    "attempt": job.attempt,
                    "status_code": outcome.status_code,
                    "latency_ms": outcome.latency_ms,
                    "error": outcome.error,
                    "response_excerpt": outcome.excerpt,
                    "outcome": outcome.kind,
                    "created_at": now,
                }
            )
            values: dict[str, Any] = {
                "b_id": job.delivery_id,
                "b_owner": owner,
                "b_attempts": job.attempt,
                "b_code": outcome.status_code,
                "b_error": outcome.error,
                "b_next": job.next_attempt_at,
                "b_delivered": None,
                "b_now": now,
            }
            if outcome.kind == "delivered":
                values.update(b_status="delivered", b_delivered=now)
                sub.failing_since = None
            elif outcome.kind == "gone":
                values["b_status"] = "failed"
                disable.append((sub, "endpoint answered 410 Gone"))
            elif outcome.kind == "failed":
                values["b_status"] = "failed"
            else:
                delay = http.next_delay(job.attempt, outcome.retry_after)
                if delay is None:
                    values["b_status"] = "dead"
                else:
                    values.update(b_status="pending", b_next=now + delay)
                sub.failing_since = sub.failing_since or now
                if now - sub.failing_since >= limit:
                    since = sub.failing_since.isoformat()
                    disable.append((sub, f"failing continuously since {since}"))
            updates.append(values)
        if attempts:
            s.execute(_INSERT_ATTEMPT, attempts)
        # Delivered ones go by status code, one statement each; the rest row by row.
        alike: dict[int | None, list[str]] = defaultdict(list)
        for values in updates:
            if values["b_status"] == "delivered":
                alike[values["b_code"]].append(values["b_id"])
        for code, ids in alike.items():
            group = {"b_ids": ids, "b_owner": owner, "b_status": "delivered", "b_code": code}
            s.execute(_RECORD_ALIKE, {**group, "b_delivered": now, "b_now": now})
        others = [values for values in updates if values["b_status"] != "delivered"]
        if others:
            s.execute(_RECORD, others)
        if unsent:
            s.execute(_RELEASE, [{"b_id": job.delivery_id, "b_owner": owner} for job in unsent])
        for sub, reason in disable:
            _disable(s, sub, reason, now)
        uow.commit()


def _disable(s: Session, sub: Subscription, reason: str, now: datetime) -> None:
    # Conditional update: of several deliveries failing at once, exactly one disables the
    # endpoint and emits the event.
    s.flush()
    flipped = s.execute(
        update(Subscription)
        .where(col(Subscription.id) == sub.id, col(Subscription.status) == "active")
        .values(status="disabled", disabled_reason=reason, updated_at=now)
    )
    if flipped.rowcount != 1:  # type: ignore[attr-defined]
        return
    s.refresh(sub)
    record_event(
        s,
        "webhook.endpoint_disabled",
        sub.connection_id,
        {"subscription": subscriptions.view(sub), "reason": reason},
    )


def _client_for(rt: Runtime) -> httpx.Client:
    """One long-lived client per runtime (process): its pool keeps connections to receivers
    alive between batches, and building the guarded transport (TLS contexts) is far too slow
    to repeat for every batch."""
    client: httpx.Client = rt._cached(
        ("webhooks",), lambda: _new_client(rt.settings, rt.outbound().transport())
    )
    return client


def _new_client(settings: Settings, transport: httpx.BaseTransport) -> httpx.Client:
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(
            settings.webhook_timeout_s, connect=min(3.0, settings.webhook_timeout_s)
        ),
        follow_redirects=False,
    )


def deliver_due(
    rt: Runtime,
    *,
    now: datetime | None = None,
    limit: int = 500,
    concurrency: int = 32,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Send every due delivery (up to ``limit`` chains); returns how many were attempted.

    Chains run concurrently; inside a chain each delivery waits for the previous one. A chain
    stops at the first delivery that is not finished by its attempt (a retry is scheduled): the
    rest go back to ``pending`` unsent, to follow it later.
    """
    now = now or datetime.now(UTC)
    owner, chains = _claim(rt, now, limit)
    if not chains:
        return 0
    settings = rt.settings
    # A job still queued when its lease is about to run out is not sent: another dispatcher
    # may take the delivery over after the lease, and two senders would break the order.
    send_until = time.monotonic() + max(
        5.0, LEASE.total_seconds() - MAX_CHAIN * settings.webhook_timeout_s
    )
    client = _client_for(rt) if transport is None else _new_client(settings, transport)

    def run(chain: list[_Job]) -> tuple[list[tuple[_Job, http.Outcome]], list[_Job]]:
        done: list[tuple[_Job, http.Outcome]] = []
        for index, job in enumerate(chain):
            if time.monotonic() > send_until:
                return done, chain[index:]
            outcome = http.send(
                client,
                job.url,
                event_id=job.event_id,
                body=job.body,
                secrets=job.secrets,
                max_response_bytes=settings.webhook_max_response_bytes,
                now=now,
            )
            done.append((job, outcome))
            if outcome.kind not in ("delivered", "failed"):
                return done, chain[index + 1 :]
        return done, []

    try:
        if len(chains) == 1:
            outcomes = [run(chains[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(concurrency, len(chains))) as pool:
                outcomes = list(pool.map(run, chains))
    finally:
        if transport is not None:
            client.close()
    results = [pair for done, _ in outcomes for pair in done]
    unsent = [job for _, rest in outcomes for job in rest]
    _record_all(rt, results, unsent, now, owner)
    return len(results)


def dispatch(
    rt: Runtime, *, now: datetime | None = None, rounds: int = 20, new_only: bool = False
) -> int:
    """Fan out, then deliver until nothing is due (bounded).

    ``new_only`` (the wake-up after a commit): stop early when the fan-out made no delivery.
    Under payment load most wake-ups find events nobody subscribed to; retries that come due
    are the periodic sweep's job (every 5 s; the first retry waits 5 s anyway).
    """
    total = 0
    for _ in range(rounds):
        created = fan_out(rt, now=now)
        if new_only and not created and total == 0:
            return 0
        sent = deliver_due(rt, now=now)
        total += sent
        if sent == 0:
            break
    return total


REDELIVERABLE = ("failed", "dead", "delivered")


def redeliver(
    rt: Runtime,
    *,
    delivery_id: str | None = None,
    failed_since: datetime | None = None,
    statuses: Sequence[str] = ("failed", "dead"),
    subscription_id: str | None = None,
    now: datetime | None = None,
) -> int:
    """Queue deliveries again (same event id, so receivers can de-duplicate).

    One delivery by id (in any state but in flight), or in bulk every delivery in ``statuses``
    (by default the finished-unsuccessfully ones: ``failed`` and ``dead``) last updated at or
    after ``failed_since`` (default: the last 30 days), optionally for one subscription. A
    requeued delivery takes its place in its payment's chain again: later events of that
    payment not yet sent wait for it.
    """
    now = now or datetime.now(UTC)
    bad = sorted(set(statuses) - set(REDELIVERABLE))
    if bad:
        raise ValueError(f"cannot redeliver deliveries in {bad}: only {list(REDELIVERABLE)}")
    with UnitOfWork(rt.engine) as uow:
        query = update(Delivery).values(
            status="pending",
            next_attempt_at=now,
            lease_until=None,
            lease_owner=None,
            updated_at=now,
        )
        if delivery_id is not None:
            in_flight = (col(Delivery.status) == "sending") & (col(Delivery.lease_until) >= now)
            query = query.where(col(Delivery.id) == delivery_id, ~in_flight)
        else:
            query = query.where(
                col(Delivery.status).in_(tuple(statuses)),
                col(Delivery.updated_at) >= (failed_since or now - timedelta(days=30)),
            )
            if subscription_id is not None:
                query = query.where(col(Delivery.subscription_id) == subscription_id)
        count = int(uow.session.execute(query).rowcount)  # type: ignore[attr-defined]
        uow.commit()
    return count


def retry_pending(
    rt: Runtime,
    *,
    subscription_id: str | None = None,
    connection_id: str | None = None,
    now: datetime | None = None,
) -> int:
    """Make every delivery waiting for a retry due now; returns how many were waiting.

    For a receiver that came back: instead of waiting out the backoff (up to 20 h between the
    last attempts), its pending deliveries go on the next dispatcher run, in order. Limited to one
    subscription, or to the subscriptions of one connection (its webhookUrl and its REST hooks),
    when given.
    """
    now = now or datetime.now(UTC)
    with UnitOfWork(rt.engine) as uow:
        query = (
            update(Delivery)
            .where(col(Delivery.status) == "pending", col(Delivery.next_attempt_at) > now)
            .values(next_attempt_at=now, updated_at=now)
        )
        if subscription_id is not None:
            query = query.where(col(Delivery.subscription_id) == subscription_id)
        if connection_id is not None:
            of_connection = select(col(Subscription.id)).where(
                col(Subscription.connection_id) == connection_id
            )
            query = query.where(col(Delivery.subscription_id).in_(of_connection))
        count = int(uow.session.execute(query).rowcount)  # type: ignore[attr-defined]
        uow.commit()
    return count
