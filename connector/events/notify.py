"""Wake the dispatcher promptly after a transaction that wrote events commits.

Listeners are registered by the process that can act on it (a Celery producer enqueues the
dispatch task; the embedded mode kicks its in-process dispatcher). A beat sweep remains the
safety net, so a lost wake-up only delays delivery, it never loses an event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session

_listeners: list[Callable[[], None]] = []
_lock = threading.Lock()
_FLAG = "x402c_events_pending"


def on_events_committed(callback: Callable[[], None]) -> None:
    with _lock:
        if callback not in _listeners:
            _listeners.append(callback)


def clear_listeners() -> None:
    with _lock:
        _listeners.clear()


def mark_pending(session: Session) -> None:
    session.info[_FLAG] = True


def events_committed() -> None:
    """Wake the listeners: events were just committed (by a session's commit, below, or by a
    statement that was its own transaction)."""
    with _lock:
        listeners = list(_listeners)
    for callback in listeners:
        try:
            callback()
        except Exception:  # a wake-up must never break the committing caller
            logging.getLogger(__name__).warning("event wake-up failed", exc_info=True)


@sa_event.listens_for(OrmSession, "after_commit")
def _after_commit(session: OrmSession) -> None:
    if session.info.pop(_FLAG, False):
        events_committed()


@sa_event.listens_for(OrmSession, "after_rollback")
def _after_rollback(session: OrmSession) -> None:
    session.info.pop(_FLAG, None)
