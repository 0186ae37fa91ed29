"""Column types that keep money exact on every backend.

EIP-3009 values are uint256. PostgreSQL stores them as NUMERIC(78,0); SQLite would silently turn
a large NUMERIC into a float, so there they are stored as zero-padded 78-digit text, which still
sorts and compares numerically. Either way Python sees a plain ``int``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

UINT256_MAX = 2**256 - 1
_DIGITS = 78


class Uint256(TypeDecorator[int]):
    impl = String(_DIGITS)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(Numeric(_DIGITS, 0))
        return dialect.type_descriptor(String(_DIGITS))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"money must be an int in atomic units, got {type(value).__name__}")
        if not 0 <= value <= UINT256_MAX:
            raise ValueError("amount outside uint256 range")
        if dialect.name == "postgresql":
            return Decimal(value)
        return str(value).zfill(_DIGITS)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return int(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zones and hands back naive values; this type stores UTC and always returns
    an aware ``datetime`` in UTC, so comparisons with ``datetime.now(UTC)`` never raise.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
