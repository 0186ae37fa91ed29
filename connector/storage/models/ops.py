"""Operational state: when each periodic (beat) task last ran."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from connector.storage.types import UTCDateTime


class BeatTick(SQLModel, table=True):
    """One row per beat task, rewritten each time it runs on a worker. The newest ``ran_at``
    proves that beat schedules and workers execute: ``/healthz`` reports it."""

    __tablename__ = "beat_ticks"

    name: str = Field(primary_key=True, max_length=64)
    ran_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
