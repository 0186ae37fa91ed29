"""Cursor pages: `limit` + `starting_after` (an id). Ids are time-ordered: the order is stable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Query
from sqlalchemy import Select
from sqlmodel import Session, col


class PageParams:
    def __init__(
        self,
        limit: int = Query(50, ge=1, le=200),
        starting_after: str | None = Query(None, max_length=40),
    ) -> None:
        self.limit = limit
        self.starting_after = starting_after


def page(
    session: Session, query: Select[Any], id_column: Any, params: PageParams
) -> tuple[Sequence[Any], bool]:
    if params.starting_after:
        query = query.where(col(id_column) > params.starting_after)
    rows = list(session.execute(query.order_by(col(id_column)).limit(params.limit + 1)).scalars())
    return rows[: params.limit], len(rows) > params.limit


def envelope(data: list[Any], has_more: bool) -> dict[str, Any]:
    next_cursor = None
    if has_more and data:
        last = data[-1]
        next_cursor = last["id"] if isinstance(last, dict) else getattr(last, "id", None)
    return {"object": "list", "data": data, "has_more": has_more, "next_cursor": next_cursor}
