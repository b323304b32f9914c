"""Query filters given more than once.

`GET /v1/diagnoses?status=failed&status=cancelled` means "failed or cancelled": the filters
that take a list (MULTI_VALUE_QUERY) match any of their values. Any other query parameter given
twice is ambiguous and answers 422 (`reject_repeated_query`, an app-wide dependency) rather
than silently using the last value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import product
from typing import Any, TypeVar

from fastapi import Request

from service.errors import BadInputError

MULTI_VALUE_QUERY = frozenset({"status", "model_id"})
MAX_FILTER_COMBINATIONS = 50

T = TypeVar("T")


async def reject_repeated_query(request: Request) -> None:
    counts = Counter(key for key, _ in request.query_params.multi_items())
    for key, count in counts.items():
        if count > 1 and key not in MULTI_VALUE_QUERY:
            raise BadInputError(f"query parameter {key!r} is given {count} times; give it once")


def distinct(values: Iterable[T] | None) -> list[T | None]:
    """The values of a list filter, each once, in order; [None] (no filter) when none."""
    seen: list[T | None] = list(dict.fromkeys(values or ()))
    return seen or [None]


def merged_page(
    fetch: Callable[..., tuple[list[Any], Any]],
    filters: dict[str, Sequence[Any]],
    *,
    limit: int,
    cursor_of: Callable[[Any], Any],
) -> tuple[list[Any], Any]:
    """One newest-first page matching any combination of `filters`' values: `fetch(**one
    combination)` returns (page, next cursor) as a repository's list_page does; their pages
    are merged on (created_at, id), the order of every such page, so the keyset cursor of the
    merged page's last item continues all of them."""
    keys = list(filters)
    combos = list(product(*(filters[k] for k in keys)))
    if len(combos) > MAX_FILTER_COMBINATIONS:
        raise BadInputError(
            f"too many filter values ({len(combos)} combinations of {', '.join(keys)}); "
            f"give at most {MAX_FILTER_COMBINATIONS}"
        )
    if len(combos) == 1:
        return fetch(**dict(zip(keys, combos[0], strict=True)))
    items: dict[str, Any] = {}
    more = False
    for combo in combos:
        page, nxt = fetch(**dict(zip(keys, combo, strict=True)))
        more = more or nxt is not None
        for item in page:
            items[item.id] = item
    ordered = sorted(items.values(), key=lambda i: (i.created_at, i.id), reverse=True)
    page = ordered[:limit]
    if (len(ordered) > limit or more) and page:
        return page, cursor_of(page[-1])
    return page, None
