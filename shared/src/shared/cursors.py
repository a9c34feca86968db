"""Cursors: the SSE ``id:`` of every event, naming both the job and the place in its stream.

A cursor is ``<job_id>_<stream entry id>``. It is opaque to clients; carrying the job id is
what lets a bare ``Last-Event-ID`` find the job again on any gateway. An event a gateway
makes up (the error it sends when Redis is out of reach) is no entry of the stream: its
cursor is the reader's last entry's with ``~`` after it (``MADE_UP``), unique within the
job. That event was final for its reader, and nothing follows a final event: a reconnect
with it is answered as one with the final event's own cursor (204).
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

_JOB_ID = re.compile(r"[0-9a-f]{32}")
# [0-9], not \d: \d takes any script's digits, which Redis refuses as an entry id.
MADE_UP = "~"
_CURSOR = re.compile(rf"([0-9a-f]{{32}})_([0-9]{{1,20}}-[0-9]{{1,20}})({re.escape(MADE_UP)}?)")

START = "0-0"  # the stream position before the first event
_MAX_ID_PART = 2**64 - 1  # each half of a stream entry id is an unsigned 64-bit number


class Cursor(NamedTuple):
    job_id: str
    entry_id: str
    made_up: bool = False  # the cursor of a final event a gateway made up

    def __str__(self) -> str:
        return f"{self.job_id}_{self.entry_id}{MADE_UP if self.made_up else ''}"


MAX_SHARDS = 256  # what the job id's two hex digits name


def new_job_id(shard: int = 0) -> str:
    """The shard's number (two hex digits: where the job lives, see shards.py), then 120
    random bits: job ids are unguessable, so knowing one is the right to read it."""
    return f"{shard:02x}{secrets.token_hex(15)}"


def is_job_id(value: str) -> bool:
    return _JOB_ID.fullmatch(value) is not None


def parse_cursor(value: str) -> Cursor | None:
    """The cursor ``value`` spells exactly, or None; ``<job>_0-0`` names no event (the
    start of a job's events is its URL without a cursor), ``<job>_0-0~`` the start (an event
    made up for a reader that had none)."""
    match = _CURSOR.fullmatch(value)
    if match is None or (match.group(2) == START and not match.group(3)):
        return None
    ms, _, seq = match.group(2).partition("-")
    if int(ms) > _MAX_ID_PART or int(seq) > _MAX_ID_PART:
        return None  # Redis refuses such an entry id; no stream of ours holds one
    return Cursor(match.group(1), match.group(2), bool(match.group(3)))
