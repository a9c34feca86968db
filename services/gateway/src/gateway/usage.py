"""``GET /usage``: the caller's own key's token usage, per day and model.

Workers count a job's usage in the same step as its final event (the library's ``append``),
into one hash per key (``Keys.usage``): fields ``<day>|<model>|<figure>``, the day
Redis's (UTC). A caller only ever reads its own key's hash; without API keys, the one
shared by every caller.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections import defaultdict

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared.event_log import USAGE_RETENTION_S
from shared.keys import Keys

from .errors import BadRequest
from .inputs import query_params
from .state import State

EPOCH = dt.date(1970, 1, 1)
DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
FIGURES = ("prompt_tokens", "completion_tokens", "total_tokens", "jobs", "unknown_jobs")


async def usage(request: Request) -> Response:
    state: State = request.app.state.sg
    identity = state.access.identify(request)
    params = query_params(request)
    since = _day(params["since"]) if "since" in params else None
    # A key's jobs run in every shard, each counting its own: the sum, or 503 when a
    # shard cannot answer (a part would read as less usage than there was).
    counted = await asyncio.gather(
        *(_counted(shard.arq, shard.log.keys, identity) for shard in state.shards)
    )
    today = min(seconds for seconds, _ in counted) // 86400
    first = max(since or 0, today - USAGE_RETENTION_S // 86400)
    rows: dict[tuple[int, str], dict[str, int]] = defaultdict(dict.fromkeys(FIGURES, 0).copy)
    for _, fields in counted:
        for name, value in fields.items():
            day, rest = name.decode().split("|", 1)
            model, figure = rest.rsplit("|", 1)  # a model's name may hold "|", a figure's not
            if int(day) >= first and figure in FIGURES:
                rows[int(day), model][figure] += int(value)
    return JSONResponse(
        [
            {"day": (EPOCH + dt.timedelta(days=day)).isoformat(), "model": model, **figures}
            for (day, model), figures in sorted(rows.items())
        ]
    )


async def _counted(redis: Redis, names: Keys, identity: str) -> tuple[int, dict[bytes, bytes]]:
    """One shard's clock (seconds) and its counts for the key."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(names.usage(identity))
        (seconds, _), fields = await pipe.execute()
    return seconds, fields


def _day(text: str) -> int:
    # fromisoformat alone would take ISO week dates (2026-W49-1) and basic ones (20261207).
    if not DAY.fullmatch(text):
        return _bad(text)
    try:
        return (dt.date.fromisoformat(text) - EPOCH).days
    except ValueError:
        return _bad(text)


def _bad(text: str) -> int:
    raise BadRequest(f"since must be a day as YYYY-MM-DD (got {text[:40]!r})")
