"""Timestamps: what the ledger stores, and what operators may type.

Stored timestamps are UTC ISO-8601 text with milliseconds (``2026-11-27T05:19:35.123Z``)
so that they sort as text and read well in plain SQL. They come from Python, never
from SQL functions, so every backend stores the same thing.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from ledger.errors import BadInput

_RELATIVE = re.compile(r"([0-9]{1,6})([smhdw])")  # ASCII digits only
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def now() -> str:
    """The current time as a ledger timestamp."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def stamp(moment: datetime) -> str:
    """A timezone-aware datetime as a ledger timestamp."""
    moment = moment.astimezone(UTC)
    # The year is padded here: strftime's %Y gives "1", not "0001", for early years.
    return f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S") + \
        f".{moment.microsecond // 1000:03d}Z"


def parse(text: str) -> datetime:
    """A ledger timestamp (or any ISO-8601 form with a zone, 'Z' included) as a datetime."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_when(text: str) -> str:
    """What an operator types for --since/--until, as a ledger timestamp.

    Accepts a date (``2026-11-01``), a date and time (``2026-11-01T10:30:00Z``, UTC when
    no zone is given), or an age (``90m``, ``12h``, ``7d``, ``2w``: that long ago).
    """
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        seconds = int(relative.group(1)) * _UNITS[relative.group(2)]
        try:
            return stamp(datetime.now(UTC) - timedelta(seconds=seconds))
        except OverflowError:
            raise BadInput(f"cannot read the time {text!r}: that age reaches back before "
                           "the year 1") from None
    try:
        return stamp(parse(value))
    except (ValueError, OverflowError):
        raise BadInput(
            f"cannot read the time {text!r}; use a date (2026-11-01), a UTC time "
            "(2026-11-01T10:30:00Z) or an age (90m, 12h, 7d, 2w)"
        ) from None


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from *start* to *end*, or None when either is missing."""
    if not start or not end:
        return None
    return round((parse(end) - parse(start)).total_seconds(), 3)
