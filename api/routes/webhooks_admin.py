"""Admin API for events, deliveries and subscriptions (/v1/admin)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlmodel import Session, col

from api.deps import DB_SESSION, require, runtime
from api.pagination import PageParams, envelope, page
from api.params import DeliveryStatus, IsoDatetime
from connector.errors import Conflict, NotFound
from connector.events.outbox import body_of, record_event
from connector.runtime import Runtime
from connector.storage.models.connections import AdminKey
from connector.storage.models.events import Delivery, DeliveryAttempt, Event, Subscription
from connector.webhooks import dispatcher, subscriptions

router = APIRouter(prefix="/v1/admin", tags=["webhooks"])
READ = Depends(require("read"))
ADMIN = Depends(require("admin"))


@router.get("/events")
def list_events(
    params: PageParams = Depends(),
    connection_id: str | None = Query(None, max_length=40),
    type: str | None = Query(None, max_length=64),
    _: AdminKey = READ,
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    query = select(Event)
    if connection_id:
        query = query.where(col(Event.connection_id) == connection_id)
    if type:
        query = query.where(col(Event.type) == type)
    rows, more = page(s, query, Event.id, params)
    return envelope(
        [{**body_of(r.payload, r.sequence), "dispatched": r.dispatched} for r in rows], more
    )


def _delivery_views(s: Session, rows: Sequence[Delivery]) -> list[dict[str, Any]]:
    """Deliveries with their attempt logs: one query for the attempts of the whole page."""
    logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if rows:
        attempts = s.execute(
            select(DeliveryAttempt)
            .where(col(DeliveryAttempt.delivery_id).in_([r.id for r in rows]))
            .order_by(col(DeliveryAttempt.delivery_id), col(DeliveryAttempt.attempt))
        ).scalars()
        for attempt in attempts:
            logs[attempt.delivery_id].append(attempt.model_dump(mode="json"))
    return [
        {**row.model_dump(mode="json"), "object": "delivery", "attempt_log": logs[row.id]}
        for row in rows
    ]


@router.get("/deliveries")
def list_deliveries(
    params: PageParams = Depends(),
    status: DeliveryStatus | None = Query(None),
    event_id: str | None = Query(None, max_length=40),
    subscription_id: str | None = Query(None, max_length=40),
    _: AdminKey = READ,
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    query = select(Delivery)
    if status:
        query = query.where(col(Delivery.status) == status)
    if event_id:
        query = query.where(col(Delivery.event_id) == event_id)
    if subscription_id:
        query = query.where(col(Delivery.subscription_id) == subscription_id)
    rows, more = page(s, query, Delivery.id, params)
    return envelope(_delivery_views(s, rows), more)


@router.post("/deliveries/{delivery_id}/redeliver")
def redeliver_one(
    delivery_id: str,
    _: AdminKey = ADMIN,
    rt: Runtime = Depends(runtime),
    s: Session = DB_SESSION,
) -> dict[str, Any]:
    count = dispatcher.redeliver(rt, delivery_id=delivery_id)
    if count == 0:
        if s.get(Delivery, delivery_id) is None:
            raise NotFound(f"delivery {delivery_id} not found")
        raise Conflict(f"delivery {delivery_id} is being sent right now; try again shortly")
    rt.dispatch("x402c.dispatch_webhooks", ())
    return {"requeued": count}


class RedeliverFailed(BaseModel):
    since: IsoDatetime
    statuses: list[Literal["failed", "dead", "delivered"]] = Field(
        default_factory=lambda: ["failed", "dead"], min_length=1, max_length=3
    )
    subscription_id: str | None = Field(default=None, max_length=40)


@router.post("/deliveries/redeliver")
def redeliver_failed(
    body: RedeliverFailed, _: AdminKey = ADMIN, rt: Runtime = Depends(runtime)
) -> dict[str, Any]:
    """Requeue, in bulk, deliveries in ``statuses`` (default failed and dead) last updated at or
    after ``since``."""
    count = dispatcher.redeliver(
        rt,
        failed_since=body.since,
        statuses=body.statuses,
        subscription_id=body.subscription_id,
    )
    rt.dispatch("x402c.dispatch_webhooks", ())
    return {"requeued": count}


class RetryPending(BaseModel):
    subscription_id: str | None = Field(default=None, max_length=40)
    connection_id: str | None = Field(default=None, max_length=40)


@router.post("/deliveries/retry-pending")
def retry_pending(
    body: RetryPending | None = None, _: AdminKey = ADMIN, rt: Runtime = Depends(runtime)
) -> dict[str, Any]:
    """Send every delivery waiting for a retry now, instead of after its backoff (a receiver
    came back). The body (optional) limits it to one subscription or connection."""
    body = body or RetryPending()
    count = dispatcher.retry_pending(
        rt, subscription_id=body.subscription_id, connection_id=body.connection_id
    )
    rt.dispatch("x402c.dispatch_webhooks", ())
    return {"requeued": count}


@router.get("/subscriptions")
def list_subscriptions(
    params: PageParams = Depends(), _: AdminKey = READ, s: Session = DB_SESSION
) -> dict[str, Any]:
    rows, more = page(s, select(Subscription), Subscription.id, params)
    return envelope([subscriptions.view(r, s) for r in rows], more)


class SubscriptionCreate(BaseModel):
    connection_id: str | None = Field(default=None, max_length=40)
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(default_factory=list, max_length=64)
    description: str | None = Field(default=None, max_length=256)


@router.post("/subscriptions", status_code=201)
def create_subscription(
    body: SubscriptionCreate,
    key: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> dict[str, Any]:
    sub, secret = subscriptions.create(
        s,
        rt.vault,
        connection_id=body.connection_id,
        url=body.url,
        event_types=body.event_types,
        description=body.description,
        policy=rt.outbound(),
        created_by_key=key.id,
    )
    return {**subscriptions.view(sub), "secret_once": secret}


@router.delete("/subscriptions/{subscription_id}")
def delete_subscription(
    subscription_id: str, _: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    return subscriptions.view(subscriptions.remove(s, subscription_id))


@router.post("/subscriptions/{subscription_id}/rotate-secret")
def rotate_subscription_secret(
    subscription_id: str,
    _: AdminKey = ADMIN,
    s: Session = DB_SESSION,
    rt: Runtime = Depends(runtime),
) -> dict[str, Any]:
    overlap = timedelta(hours=rt.settings.webhook_secret_overlap_hours)
    sub, fresh = subscriptions.rotate_secret(s, rt.vault, subscription_id, overlap)
    return {**subscriptions.view(sub), "secret_once": fresh}


@router.post("/subscriptions/{subscription_id}/enable")
def enable_subscription(
    subscription_id: str, _: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    return subscriptions.view(subscriptions.reenable(s, subscription_id))


class TestEvent(BaseModel):
    connection_id: str = Field(max_length=40)


@router.post("/events/test", status_code=201)
def send_test_event(
    body: TestEvent, _: AdminKey = ADMIN, s: Session = DB_SESSION
) -> dict[str, Any]:
    return record_event(s, "webhook.test", body.connection_id, {"test": True})
