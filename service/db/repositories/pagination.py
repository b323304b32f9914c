"""Keyset pagination, newest first, shared by the list endpoints of models and batches.

The cursor is `diagnoses.Cursor` ((created_at, id) of a page's last row), so every list of the
API hands out and accepts the same kind of cursor. Keyset rather than OFFSET: a row inserted
while a client pages neither shifts nor duplicates the rows it has yet to see.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.db.repositories.diagnoses import Cursor


class Listed(Protocol):
    id: str
    created_at: datetime


RowT = TypeVar("RowT", bound=Listed)


def newest_first_page(
    session: Session,
    query: Select[RowT],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    *,
    after: Cursor | None,
    limit: int,
) -> tuple[list[RowT], Cursor | None]:
    """One page of `query` (already filtered by tenant), newest first, and the cursor of the next
    page (None on the last page). `created_at`/`row_id` are the columns of the queried entity."""
    if after is not None:
        query = query.where(
            or_(
                created_at < after.created_at,
                and_(created_at == after.created_at, row_id < after.id),
            )
        )
    # One row more than asked tells whether a next page exists without a COUNT.
    rows = list(session.scalars(query.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, Cursor(created_at=page[-1].created_at, id=page[-1].id)
