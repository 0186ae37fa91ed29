"""Beat ticks: each periodic task records when it ran, so operators can see that beat is alive.

Without beat nothing reconciles unknown outcomes, requeues lost job messages or expires holds;
``/healthz`` and ``x402c beat-health`` report the newest tick so a dead beat is noticed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import col

from connector.storage.db import transaction
from connector.storage.models.ops import BeatTick


def record_tick(engine: Engine, name: str, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    insert_fn = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    with transaction(engine) as session:
        session.execute(
            insert_fn(BeatTick)
            .values(name=name, ran_at=now)
            .on_conflict_do_update(index_elements=["name"], set_={"ran_at": now})
        )


def last_tick(engine: Engine) -> datetime | None:
    """When a beat task last ran on a worker (``None``: never)."""
    with transaction(engine) as session:
        value = session.execute(
            select(col(BeatTick.ran_at)).order_by(col(BeatTick.ran_at).desc()).limit(1)
        ).scalar_one_or_none()
    return value


#: Beat's fastest schedule is 15 s; a tick older than this means beat (or every worker) is down.
STALE_AFTER_S = 120


def beat_status(engine: Engine, now: datetime | None = None) -> dict[str, Any]:
    """``{last_tick_at, age_s, ok}`` for ``/healthz``: is beat scheduling and a worker running?"""
    tick = last_tick(engine)
    if tick is None:
        return {"last_tick_at": None, "age_s": None, "ok": False}
    age = ((now or datetime.now(UTC)) - tick).total_seconds()
    return {"last_tick_at": tick.isoformat(), "age_s": round(age, 1), "ok": age <= STALE_AFTER_S}
