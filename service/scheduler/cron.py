"""Cron expressions read in an IANA time zone: validation and the next tick, DST-correct.

Ticks are computed on the local wall clock (what a person means by "0 9 * * *" in
Europe/Berlin: 09:00 there, summer and winter) and converted to UTC with `zoneinfo`:
- a wall time that does not exist (the hour skipped when DST starts) is read with the offset
  before the change, so it runs once, an hour later on the wall clock;
- a wall time that exists twice (the hour repeated when DST ends) runs once, at its first
  occurrence.
Only the standard 5 fields (minute hour day-of-month month day-of-week) are accepted: croniter
would also take a seconds field, which would make a scheduler polling every few seconds lie.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from service.errors import BadInputError

CRON_FIELDS = 5
# Any day: validation asks for the first tick after it (a leap day is at most 8 years away).
_VALIDATION_START = datetime(2000, 3, 1)
# Enough ticks to step over a repeated DST hour however dense the expression is.
MAX_SKIPPED_TICKS = 120


class BadScheduleError(BadInputError):
    code = "bad_schedule"


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA zone `name`; 422 naming the field otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BadScheduleError(
            f"timezone: {name!r} is not an IANA time zone name; use one like 'UTC', "
            "'Europe/Berlin' or 'America/New_York'"
        ) from exc


def validate_cron(expression: str) -> str:
    """The expression with its whitespace normalised; 422 naming the field and the problem."""
    fields = expression.split()
    if len(fields) != CRON_FIELDS:
        raise BadScheduleError(
            f"cron: {expression!r} has {len(fields)} fields; give exactly 5 "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *' for 03:00 daily"
        )
    normalised = " ".join(fields)
    try:
        croniter(normalised)
    except (ValueError, KeyError) as exc:  # croniter's errors subclass ValueError
        raise BadScheduleError(
            f"cron: {expression!r} is not a valid cron expression ({exc})"
        ) from exc
    try:
        croniter(normalised, _VALIDATION_START).get_next(datetime)
    except CroniterBadDateError as exc:
        raise _never_fires(expression) from exc
    return normalised


def _never_fires(expression: str) -> BadScheduleError:
    return BadScheduleError(
        f"cron: {expression!r} never matches a date (its day of month does not occur in its "
        "month(s), e.g. 30 February or 31 April), so the schedule would never run; give a day "
        "that exists in those months"
    )


def next_tick(expression: str, timezone: str, after: datetime) -> datetime:
    """The first tick of `expression` (in `timezone`) strictly after `after`, in UTC."""
    zone = parse_timezone(timezone)
    after_utc = after.astimezone(UTC)
    wall = after_utc.astimezone(zone).replace(tzinfo=None)
    ticks = croniter(expression, wall)
    for _ in range(MAX_SKIPPED_TICKS):
        try:
            candidate_wall: datetime = ticks.get_next(datetime)
        except CroniterBadDateError as exc:
            raise _never_fires(expression) from exc
        candidate = candidate_wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
        if candidate > after_utc:
            return candidate
    # Unreachable for real zones (a DST overlap is at most a few hours of ticks).
    return after_utc + timedelta(minutes=1)
