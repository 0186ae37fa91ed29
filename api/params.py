"""Strict parameter types for the edge, where pydantic's lax defaults would mislead a caller."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

_ISO = re.compile(
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?$"
)


def _iso_only(value: Any) -> Any:
    """Pydantic reads a number (or a numeric string) as Unix seconds, so ``since=1.5`` silently
    meant 1970; only ISO 8601 is accepted."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO.match(value):
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


IsoDatetime = Annotated[
    datetime,
    BeforeValidator(_iso_only),
    AfterValidator(_utc),
    Field(description="ISO 8601 date-time (UTC when no offset is given)."),
]

DeliveryStatus = Literal["pending", "sending", "delivered", "failed", "dead"]
