"""Outbox -> deliveries -> HTTP. Safe with any number of dispatchers running at once.

* :func:`fan_out` turns undispatched events into one Delivery per matching subscription.
* :func:`deliver_due` claims due deliveries with a conditional update (a lease), so two workers
  never send the same delivery at the same time; a worker that dies leaves a lease that expires
  and the delivery is picked up again (at least once).
* The clock is a parameter everywhere, so tests can run the whole three-day schedule in a blink.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col

from connector.connections import service as connections
from connector.events.outbox import record_event
from connector.ids import new_id
from connector.logs import get_logger
from connector.metrics import WEBHOOK_ATTEMPTS
from connector.runtime import Runtime
from connector.storage.db import UnitOfWork
from connector.storage.models.connections import Connection
from connector.storage.models.events import Delivery, DeliveryAttempt, Event, Subscription
from connector.webhooks import delivery as http
from connector.webhooks import subscriptions

log = get_logger(__name__)
LEASE = timedelta(seconds=60)


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
            .returning(col(Event.id), col(Event.type), col(Event.connection_id))
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
            insert_fn = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
            s.execute(
                insert_fn(Delivery)
                .values(rows)
                .on_conflict_do_nothing(index_elements=["event_id", "subscription_id"])
            )
        uow.commit()
    return len(rows)


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


def _claim(rt: Runtime, now: datetime, limit: int) -> list[_Job]:
    """Lease up to ``limit`` due deliveries in one statement, then load what sending needs."""
    owner = secrets_token()
    due = or_(
        (col(Delivery.status) == "pending") & (col(Delivery.next_attempt_at) <= now),
        (col(Delivery.status) == "sending") & (col(Delivery.lease_until) < now),
    )
    with UnitOfWork(rt.engine) as uow:
        s = uow.session
        candidates = select(col(Delivery.id)).where(due).order_by(col(Delivery.next_attempt_at))
        candidates = candidates.limit(limit)
        if s.get_bind().dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        s.execute(
            update(Delivery)
            .where(col(Delivery.id).in_(candidates.scalar_subquery()), due)
            .values(status="sending", lease_until=now + LEASE, lease_owner=owner, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        uow.commit()
        rows = list(s.execute(select(Delivery).where(col(Delivery.lease_owner) == owner)).scalars())
        if not rows:
            return []
        events = {
            e.id: e
            for e in s.execute(
                select(Event).where(col(Event.id).in_({r.event_id for r in rows}))
            ).scalars()
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
        jobs: list[_Job] = []
        failed: list[tuple[str, str]] = []
        for row in rows:
            event, target = events.get(row.event_id), targets.get(row.subscription_id)
            if event is None or target is None or isinstance(target, str):
                failed.append((row.id, target if isinstance(target, str) else "missing event"))
                continue
            url, secret_list = target
            body = json.dumps(event.payload, separators=(",", ":"), sort_keys=True).encode()
            jobs.append(
                _Job(
                    row.id, event.id, row.attempts + 1, url, secret_list, body, row.subscription_id
                )
            )
        for delivery_id, reason in failed:
            s.execute(
                update(Delivery)
                .where(col(Delivery.id) == delivery_id)
                .values(
                    status="failed", last_error=reason[:1000], lease_until=None, lease_owner=None
                )
            )
        uow.commit()
    return jobs


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


def _record_all(rt: Runtime, results: list[tuple[_Job, http.Outcome]], now: datetime) -> None:
    """Write every outcome of a batch in one transaction."""
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
        for job, outcome in results:
            WEBHOOK_ATTEMPTS.labels(outcome=outcome.kind).inc()
            sub = subs[job.subscription_id]
            s.add(
                DeliveryAttempt(
                    id=new_id("wha"),
                    delivery_id=job.delivery_id,
                    attempt=job.attempt,
                    status_code=outcome.status_code,
                    latency_ms=outcome.latency_ms,
                    error=outcome.error,
                    response_excerpt=outcome.excerpt,
                    outcome=outcome.kind,
                    created_at=now,
                )
            )
            values: dict[str, object] = {
                "attempts": job.attempt,
                "last_status_code": outcome.status_code,
                "last_error": outcome.error,
                "lease_until": None,
                "lease_owner": None,
                "updated_at": now,
            }
            if outcome.kind == "delivered":
                values.update(status="delivered", delivered_at=now)
                sub.failing_since = None
            elif outcome.kind == "gone":
                values["status"] = "failed"
                _disable(s, sub, "endpoint answered 410 Gone", now)
            elif outcome.kind == "failed":
                values["status"] = "failed"
            else:
                delay = http.next_delay(job.attempt, outcome.retry_after)
                if delay is None:
                    values["status"] = "dead"
                else:
                    values.update(status="pending", next_attempt_at=now + delay)
                sub.failing_since = sub.failing_since or now
                if now - sub.failing_since >= limit:
                    since = sub.failing_since.isoformat()
                    _disable(s, sub, f"failing continuously since {since}", now)
            s.execute(update(Delivery).where(col(Delivery.id) == job.delivery_id).values(**values))
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


def deliver_due(
    rt: Runtime,
    *,
    now: datetime | None = None,
    limit: int = 500,
    concurrency: int = 32,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Send every due delivery (up to ``limit``); returns how many were attempted."""
    now = now or datetime.now(UTC)
    jobs = _claim(rt, now, limit)
    if not jobs:
        return 0
    settings = rt.settings
    transport = transport or rt.outbound().transport()
    with httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(
            settings.webhook_timeout_s, connect=min(3.0, settings.webhook_timeout_s)
        ),
        follow_redirects=False,
    ) as client:

        def run(job: _Job) -> tuple[_Job, http.Outcome]:
            outcome = http.send(
                client,
                job.url,
                event_id=job.event_id,
                body=job.body,
                secrets=job.secrets,
                max_response_bytes=settings.webhook_max_response_bytes,
                now=now,
            )
            return job, outcome

        with ThreadPoolExecutor(max_workers=min(concurrency, len(jobs))) as pool:
            results = list(pool.map(run, jobs))
    _record_all(rt, results, now)
    return len(jobs)


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


def redeliver(
    rt: Runtime,
    *,
    delivery_id: str | None = None,
    failed_since: datetime | None = None,
    now: datetime | None = None,
) -> int:
    """Queue deliveries again (same event id, so receivers can de-duplicate)."""
    now = now or datetime.now(UTC)
    with UnitOfWork(rt.engine) as uow:
        query = update(Delivery).values(
            status="pending", next_attempt_at=now, lease_until=None, updated_at=now
        )
        if delivery_id is not None:
            query = query.where(col(Delivery.id) == delivery_id)
        else:
            query = query.where(
                col(Delivery.status).in_(("failed", "dead")),
                col(Delivery.updated_at) >= (failed_since or now - timedelta(days=30)),
            )
        count = int(uow.session.execute(query).rowcount)  # type: ignore[attr-defined]
        uow.commit()
    return count
