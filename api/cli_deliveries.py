"""``x402c deliveries``: see, redeliver and hurry webhook deliveries from the command line.

A sub-app of its own (added to ``x402c`` in :mod:`api.cli`), working on the database the other
commands use. The commands only change rows; the dispatcher (``x402c worker`` + ``x402c beat``,
or ``x402c dev``) sends what they requeued at its next run — within about 5 s.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

deliveries_app = typer.Typer(
    help="Webhook deliveries: list, redeliver, retry-pending.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

STATUSES = ("pending", "sending", "delivered", "failed", "dead")


def _runtime() -> Any:
    from api.cli import _runtime as runtime  # the same settings and database as every command

    return runtime()


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@deliveries_app.command("list")
def list_deliveries(
    status: Annotated[
        str | None, typer.Option(help="pending, sending, delivered, failed or dead.")
    ] = None,
    subscription: Annotated[str | None, typer.Option(help="Only this subscription.")] = None,
    payment: Annotated[str | None, typer.Option(help="Only this payment's events.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest first, at most.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List deliveries, newest first: status, attempts, next try and last error (--json for
    every field, the subscription included)."""
    import json

    from sqlalchemy import select
    from sqlmodel import col

    from connector.storage.db import transaction
    from connector.storage.models.events import Delivery, Event

    if status is not None and status not in STATUSES:
        err.print(f"[red]unknown status {status!r}:[/] one of {', '.join(STATUSES)}")
        raise typer.Exit(2)
    rt = _runtime()
    query = select(Delivery, col(Event.type)).join(Event, col(Event.id) == col(Delivery.event_id))
    if status:
        query = query.where(col(Delivery.status) == status)
    if subscription:
        query = query.where(col(Delivery.subscription_id) == subscription)
    if payment:
        query = query.where(col(Delivery.payment_id) == payment)
    with transaction(rt.engine) as s:
        rows = s.execute(query.order_by(col(Delivery.id).desc()).limit(limit)).all()
    if not rows:
        console.print("no deliveries")
        return
    if as_json:
        for delivery, event_type in rows:
            print(json.dumps({**delivery.model_dump(mode="json"), "event_type": event_type}))
        return
    table = Table(box=None)
    # Ids and statuses are never cut (they are what one copies into the next command); the
    # other columns give way on a narrow terminal.
    table.add_column("id", no_wrap=True, min_width=30)
    table.add_column("event", overflow="fold")
    table.add_column("seq")
    table.add_column("status", no_wrap=True)
    table.add_column("tries")
    table.add_column("next try (UTC)", overflow="fold")
    table.add_column("last error", overflow="fold")
    for d, event_type in rows:
        next_try = _when(d.next_attempt_at) if d.status == "pending" else "-"
        table.add_row(d.id, event_type, str(d.sequence or "-"), d.status, str(d.attempts),
                      next_try, (d.last_error or "")[:60])  # fmt: skip
    console.print(table)


@deliveries_app.command("redeliver")
def redeliver(
    delivery_id: Annotated[
        str | None, typer.Argument(help="One delivery (whd_…); or use --since.")
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(help="Bulk: deliveries last updated at or after this time (UTC)."),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(help="Bulk: failed, dead or delivered (repeatable; default failed + dead)."),
    ] = None,
    subscription: Annotated[str | None, typer.Option(help="Bulk: only this subscription.")] = None,
) -> None:
    """Send deliveries again with the same event id (receivers de-duplicate by it)."""
    from connector.webhooks import dispatcher

    if (delivery_id is None) == (since is None):
        err.print("[red]give one delivery id or --since (not both)[/]")
        raise typer.Exit(2)
    statuses = status or ["failed", "dead"]
    bad = sorted(set(statuses) - set(dispatcher.REDELIVERABLE))
    if bad:
        err.print(f"[red]cannot redeliver {bad}:[/] only {', '.join(dispatcher.REDELIVERABLE)}")
        raise typer.Exit(2)
    rt = _runtime()
    if delivery_id is not None:
        count = dispatcher.redeliver(rt, delivery_id=delivery_id)
        if count == 0:
            err.print(f"[red]delivery {delivery_id} not found or being sent right now[/]")
            raise typer.Exit(1)
    else:
        assert since is not None
        when = since if since.tzinfo else since.replace(tzinfo=UTC)
        count = dispatcher.redeliver(
            rt, failed_since=when, statuses=statuses, subscription_id=subscription
        )
    console.print(f"requeued {count}")


@deliveries_app.command("retry-pending")
def retry_pending(
    subscription: Annotated[str | None, typer.Option(help="Only this subscription.")] = None,
    connection: Annotated[
        str | None, typer.Option(help="Only this connection's subscriptions.")
    ] = None,
) -> None:
    """Retry now every delivery waiting out its backoff (the receiver is back)."""
    from connector.webhooks import dispatcher

    count = dispatcher.retry_pending(
        _runtime(), subscription_id=subscription, connection_id=connection
    )
    console.print(f"requeued {count}")
