"""Durable budget reservations that hold under any number of concurrent workers.

Protocol: *reserve* before signing, *confirm* when settled, *release* only on a definite failure
(nothing can move any more). An on-chain escrow (``authCapture``) payment's reservation follows
its escrow totals instead (:func:`follow_escrow`): held while the escrow holds part of it,
shrunk by what was voided or reclaimed, released when all of it came back. When the outcome is
unknown the reservation stays held, so the budget fails closed: we may under-spend after a crash,
never over-spend.

Serialization: every decision for a connection first bumps its ``budget_locks`` row. On
PostgreSQL that is a row lock held to commit; on SQLite it takes the database write lock. Either
way two reservations for the same connection are decided one after the other, and the sum read
inside the lock is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, SQLModel, col

from connector.errors import PolicyRefused
from connector.events.outbox import record_event
from connector.ids import new_id
from connector.policy.rules import BUDGET_WINDOWS, SpendingPolicy
from connector.storage.models.payments import BudgetLock, Reservation

ACTIVE = ("held", "confirmed")
RESERVATIONS: Table = SQLModel.metadata.tables["reservations"]
_INSERT = insert(RESERVATIONS)
_SET_STATUS = update(RESERVATIONS).where(
    RESERVATIONS.c.payment_id == bindparam("b_pay"), RESERVATIONS.c.status == bindparam("b_from")
)


@dataclass(frozen=True)
class BudgetUsage:
    window: str
    limit: int
    spent: int  # held + confirmed within the window, before this reservation

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent)


def _lock(session: Session, connection_id: str) -> None:
    # Make sure the lock row exists without racing other creators, then take it.
    dialect = session.get_bind().dialect.name
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        insert_fn(BudgetLock)
        .values(connection_id=connection_id, ticks=0)
        .on_conflict_do_nothing(index_elements=["connection_id"])
    )
    session.execute(
        update(BudgetLock)
        .where(col(BudgetLock.connection_id) == connection_id)
        .values(ticks=col(BudgetLock.ticks) + 1)
    )


def _spent_since(session: Session, connection_id: str, since: datetime) -> int:
    if session.get_bind().dialect.name == "postgresql":
        total = session.execute(
            select(func.coalesce(func.sum(col(Reservation.amount)), 0)).where(
                col(Reservation.connection_id) == connection_id,
                col(Reservation.status).in_(ACTIVE),
                col(Reservation.created_at) >= since,
            )
        ).scalar_one()
        return int(total)
    # SQLite stores uint256 as text: sum exactly in Python.
    rows = session.execute(
        select(col(Reservation.amount)).where(
            col(Reservation.connection_id) == connection_id,
            col(Reservation.status).in_(ACTIVE),
            col(Reservation.created_at) >= since,
        )
    ).scalars()
    return sum(int(a) for a in rows)


def usage(
    session: Session, connection_id: str, policy: SpendingPolicy, now: datetime | None = None
) -> list[BudgetUsage]:
    now = now or datetime.now(UTC)
    return [
        BudgetUsage(name, limit, _spent_since(session, connection_id, now - BUDGET_WINDOWS[name]))
        for name, limit in policy.budget_limits().items()
    ]


def reserve(
    session: Session,
    *,
    connection_id: str,
    payment_id: str,
    amount: int,
    policy: SpendingPolicy,
    now: datetime | None = None,
    fresh: bool = False,
) -> None:
    """Set ``amount`` aside or raise :class:`PolicyRefused` (rule ``budget.<window>``).

    Idempotent per payment: a second call for the same payment keeps the existing reservation.
    ``fresh`` says the payment is being created in this very transaction, so it cannot have a
    reservation yet and the lookup is skipped (the unique payment_id still guards it).
    """
    now = now or datetime.now(UTC)
    limited = bool(policy.budget_limits())
    if limited:
        # Serialize with every other decision for this connection before reading anything.
        _lock(session, connection_id)
    if not fresh and _exists(session, payment_id):
        return
    if not limited:
        # No budget to protect: record the spend without serializing on the lock row.
        _insert(session, connection_id, payment_id, amount, now)
        return
    for use in usage(session, connection_id, policy, now):
        if use.spent + amount > use.limit:
            raise PolicyRefused(
                f"{use.window} budget {use.limit} would be exceeded: {use.spent} already "
                f"reserved or spent, {amount} requested",
                rule=f"budget.{use.window}",
                remaining=str(use.remaining),
            )
        crossed = use.spent < policy.budget_alert_ratio * use.limit <= use.spent + amount
        if crossed:
            record_event(
                session,
                "budget.threshold_reached",
                connection_id,
                {
                    "window": use.window,
                    "limit": str(use.limit),
                    "spent": str(use.spent + amount),
                    "ratio": policy.budget_alert_ratio,
                },
            )
    _insert(session, connection_id, payment_id, amount, now)


def _exists(session: Session, payment_id: str) -> bool:
    found = session.execute(
        select(RESERVATIONS.c.id).where(RESERVATIONS.c.payment_id == payment_id)
    ).first()
    return found is not None


def _insert(
    session: Session, connection_id: str, payment_id: str, amount: int, now: datetime
) -> None:
    session.execute(
        _INSERT,
        {
            "id": new_id("rsv"),
            "connection_id": connection_id,
            "payment_id": payment_id,
            "amount": amount,
            "status": "held",
            "created_at": now,
            "updated_at": now,
        },
    )


def _set_status(session: Session, payment_id: str, status: str, from_status: str) -> bool:
    result = session.execute(
        _SET_STATUS,
        {
            "status": status,
            "updated_at": datetime.now(UTC),
            "b_pay": payment_id,
            "b_from": from_status,
        },
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def confirm(session: Session, payment_id: str) -> bool:
    """The payment settled: the reservation becomes spend."""
    return _set_status(session, payment_id, "confirmed", "held")


def unconfirm(session: Session, payment_id: str) -> bool:
    """A settled payment's settlement was undone (a chain reorganization) and it is being settled
    again: its money may still move, so it stays counted, as ``held`` again — released if it
    then definitely fails, confirmed if it settles."""
    return _set_status(session, payment_id, "held", "confirmed")


def release(session: Session, payment_id: str) -> bool:
    """The payment definitely failed (nothing can move): give the money back to the budget."""
    return _set_status(session, payment_id, "released", "held")


def recount(session: Session, payment_id: str) -> bool:
    """A payment given up as failed turned out paid: its money counts again, whatever the
    reservation's status was (held, or already released)."""
    return _set_status(session, payment_id, "confirmed", "held") or _set_status(
        session, payment_id, "confirmed", "released"
    )


_FOLLOW = update(RESERVATIONS).where(RESERVATIONS.c.payment_id == bindparam("b_pay"))


def follow_escrow(
    session: Session, payment_id: str, *, kept: int, held: bool, now: datetime | None = None
) -> bool:
    """Make an outgoing escrow payment's reservation say what the escrow says.

    ``kept`` is what the payment still costs (held in the escrow + captured); ``held`` whether
    the escrow still holds part of it. While held the reservation stays ``held`` (the money may
    still come back); once nothing is held it is ``confirmed`` for what was captured, or
    ``released`` when nothing was (all of it voided or reclaimed). The write is absolute, not a
    delta: it runs in the transaction that applies the escrow events to the payment (whose
    versioned write lets only one applier commit), and repeating it changes nothing — so what
    came back is given back to the budget exactly once. Only lowers or keeps spend for a payment
    already counted; a reservation released earlier (a payment given up as failed that the
    escrow shows funded) counts again, like :func:`recount`.
    """
    status = "held" if held else "confirmed" if kept > 0 else "released"
    values: dict[str, object] = {
        "status": status,
        "updated_at": now or datetime.now(UTC),
        "b_pay": payment_id,
    }
    if kept > 0:
        values["amount"] = kept
    result = session.execute(_FOLLOW, values)
    return bool(result.rowcount)  # type: ignore[attr-defined]
