"""Webhook dispatch task: woken after commits that wrote events, and swept by beat."""

from __future__ import annotations

from connector.webhooks.dispatcher import dispatch
from workers.celery_app import celery_app
from workers.runtime import runtime


@celery_app.task(name="x402c.dispatch_webhooks", acks_late=True)
def dispatch_webhooks(new_only: bool = False) -> int:
    """``new_only``: sent by the after-commit wake-up (see ``dispatch``); the sweep sends all."""
    return dispatch(runtime(), new_only=new_only)


celery_app.conf.beat_schedule = {
    **(celery_app.conf.beat_schedule or {}),
    "dispatch-webhooks": {"task": "x402c.dispatch_webhooks", "schedule": 5.0},
}
