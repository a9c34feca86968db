"""The ``current_time`` tool: models have no clock, so they ask for one.

The answer is ISO 8601 to the second with the zone's UTC offset
(``2026-11-25T08:00:00+01:00``), which models read reliably. Zone names are IANA keys
resolved by :mod:`zoneinfo` (the ``tzdata`` package supplies the database where the OS
has none). A key in the wrong case (``europe/oslo``) is matched case-insensitively
before giving up, since models often lower-case it; anything else unknown is an error
that says what a valid name looks like.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import datetime
from typing import Annotated

from pydantic import Field


class UnknownTimezoneError(ValueError):
    """The time zone name is not an IANA zone known here."""


def current_time(
    timezone: Annotated[
        str,
        Field(description="IANA time zone name, e.g. 'Europe/Oslo' or 'America/New_York'."),
    ] = "UTC",
) -> str:
    """Get the current date and time in an IANA time zone, as ISO 8601 with its UTC offset."""
    return datetime.now(resolve_zone(timezone)).isoformat(timespec="seconds")


def resolve_zone(name: str) -> zoneinfo.ZoneInfo:
    """The zone named ``name`` (case-insensitively); :class:`UnknownTimezoneError` if none."""
    key = name.strip()
    try:
        return zoneinfo.ZoneInfo(key)
    # ValueError: malformed keys (absolute, '..', NUL); OSError: a directory, too long.
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    canonical = _keys_by_folded_name().get(key.casefold())
    if canonical is None:
        raise UnknownTimezoneError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC', "
            "'Europe/Oslo' or 'America/New_York'"
        )
    return zoneinfo.ZoneInfo(canonical)


@functools.cache
def _keys_by_folded_name() -> dict[str, str]:
    # Walking the zone database takes tens of milliseconds; do it once, on first miss.
    return {key.casefold(): key for key in zoneinfo.available_timezones()}
