"""Properties of the worker's publishing (worker/publisher.py): merged tokens, numbered
batches, retries after lost connections and lost replies, the final event.

The real ``Publisher`` and ``Batcher`` write to a fake event log that applies batches as
the append function does (a batch number at or below the last applied one is acknowledged,
not written; nothing is written after a final event, whose own batch is acknowledged if
sent again) and fails as a connection does: before a batch reaches Redis, or after, its
reply lost. Its writes take loop turns, during which the job emits more.
"""

from __future__ import annotations

import asyncio
import operator
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast
from unittest import mock

from hypothesis import event, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import events as ev
from shared.event_log import Closing
from worker import publisher
from worker.publisher import MERGE_MAX, Batcher

OWNER = "attempt-1"
STALL_TURNS = 10_000
Request = list[tuple[str, int, list[ev.Event]]]  # (job, batch number, events) per job


class _FakeLog:
    """``EventLog.append_many`` over a connection that fails on cue. ``faults`` says, per
    round trip: ``"ok"``, ``"lost"`` (fails before anything is applied) or ``"late"``
    (applied, but its reply is lost), and how many loop turns it takes."""

    def __init__(self, faults: list[tuple[str, int]]) -> None:
        self.faults = faults
        self.written: dict[str, list[ev.Event]] = defaultdict(list)
        self.last_batch: dict[str, int] = defaultdict(int)
        self.ended: set[str] = set()
        self.requests: list[Request] = []
        self.failed: list[bool] = []  # per round trip: whether it raised
        self.refused: list[str] = []  # new batches sent after the job's final event
        self.acknowledged = 0  # retries of batches that did reach Redis

    async def append_many(
        self, batches: Sequence[tuple[str, str, int, Sequence[ev.Event], Closing | None]]
    ) -> list[bool | Exception]:
        fault, turns = self.faults.pop(0) if self.faults else ("ok", 0)
        self.requests.append(
            [(job_id, number, list(batch)) for job_id, _, number, batch, _ in batches]
        )
        self.failed.append(fault != "ok")
        for _ in range(turns):  # the job goes on emitting while the write is out
            await asyncio.sleep(0)
        if fault == "lost":
            raise RedisConnectionError("Connection reset by peer")
        results: list[bool | Exception] = [self._append(*batch[:4]) for batch in batches]
        if fault == "late":
            raise RedisTimeoutError("Timeout reading from socket")
        return results

    def _append(self, job_id: str, owner: str, number: int, batch: Sequence[ev.Event]) -> bool:
        """The append function: fenced by owner (none once the final event is written),
        but the retry of the owner's own final batch is acknowledged."""
        assert owner == OWNER
        if job_id in self.ended:
            if number <= self.last_batch[job_id]:
                self.acknowledged += 1
                return True
            self.refused.append(job_id)
            return False
        if number <= self.last_batch[job_id]:
            self.acknowledged += 1  # a retry of a batch that did reach Redis
            return True
        self.last_batch[job_id] = number
        for e in batch:
            self.written[job_id].append(e)
            if ev.is_final(e):
                self.ended.add(job_id)
                return True
        return True


class _NoBackoff:
    """``asyncio`` as worker/publisher.py sees it, its retry backoff one loop turn (a
    hundred retries would otherwise take minutes), the rest untouched."""

    _sleep = staticmethod(asyncio.sleep)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, _delay: float) -> None:
        await self._sleep(0)


@contextmanager
def _instant_retries() -> Iterator[None]:
    with mock.patch.object(publisher, "asyncio", _NoBackoff()):
        yield


_texts = st.one_of(
    st.text(max_size=4),  # empty included: never sent
    # Long runs, cheaply: past MERGE_MAX alone or after a few merges.
    st.builds(operator.mul, st.text(min_size=1, max_size=3), st.integers(1, 2500)),
)
_others = st.one_of(
    st.integers(0, 10**6).map(lambda i: ev.ToolCallStarted(f"call_{i}", "calculator")),
    st.integers(0, 10**6).map(
        lambda i: ev.ToolsCalled([ev.ToolResult(f"call_{i}", "calculator", {"x": i}, str(i))])
    ),
)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(0, 2), _texts.map(ev.Token)),
        st.tuples(st.just("emit"), st.integers(0, 2), _texts.map(ev.Token)),
        st.tuples(st.just("emit"), st.integers(0, 2), _others),
        st.tuples(st.just("turns"), st.integers(1, 4), st.none()),
    ),
    max_size=50,
)
_faults = st.lists(
    st.tuples(st.sampled_from(["ok", "lost", "late"]), st.integers(0, 4)), max_size=20
)
_finals = st.sampled_from([ev.Done("stop"), ev.Error("the agent could not answer")])


def _check_stream(emitted: list[ev.Event], written: list[ev.Event]) -> None:
    """``written`` is ``emitted`` without empty tokens, each run of tokens possibly merged
    (never past MERGE_MAX, unless it is one token that long), nothing lost, repeated or
    moved."""
    sent = [e for e in emitted if not (isinstance(e, ev.Token) and not e.text)]
    at = 0
    for w in written:
        if isinstance(w, ev.Token):
            assert w.text, "an empty token was written"
            text, merged = "", 0
            while at < len(sent) and isinstance(sent[at], ev.Token) and len(text) < len(w.text):
                text += cast(ev.Token, sent[at]).text
                at, merged = at + 1, merged + 1
            assert text == w.text, "token text lost, repeated or reordered"
            assert merged == 1 or len(w.text) <= MERGE_MAX, f"{merged} tokens merged past it"
            event("tokens merged" if merged > 1 else "a token written as it came")
            after = sent[at] if at < len(sent) else None
            if len(w.text) > MERGE_MAX:
                event("a token past MERGE_MAX, alone")
            elif isinstance(after, ev.Token) and len(w.text) + len(after.text) > MERGE_MAX:
                event("a merge stopped at MERGE_MAX")
        else:
            assert at < len(sent) and w == sent[at], f"{w} out of place"
            at += 1
    assert at == len(sent), f"{len(sent) - at} events never written"


def _check_numbering(log: _FakeLog) -> None:
    """Each round trip after a failed one is that one again (same numbers, same events);
    after a good one, each job's batch number is above any it sent before."""
    last: dict[str, int] = {}
    for i, request in enumerate(log.requests):
        if i and log.failed[i - 1]:
            assert request == log.requests[i - 1], "a retry is not the same write"
            continue
        for job_id, number, _ in request:
            assert number > last.get(job_id, 0), f"batch {number} of {job_id} after {last}"
            last[job_id] = number


@settings(max_examples=300, deadline=None)
@given(ops=_ops, faults=_faults, finals=st.lists(_finals, min_size=1, max_size=3))
def test_what_a_job_emits_is_written_once_in_order_whatever_the_connection_does(
    ops: list[tuple[str, int, ev.Event | None]],
    faults: list[tuple[str, int]],
    finals: list[ev.Event],
) -> None:
    jobs = [f"job-{i}" for i in range(len(finals))]
    log = _FakeLog(list(faults))
    emitted: dict[str, list[ev.Event]] = {job_id: [] for job_id in jobs}

    async def scenario() -> list[bool]:
        batcher = Batcher(cast(Any, log), redis_patience_s=3600)
        publishers = [batcher.publisher(job_id, OWNER) for job_id in jobs]
        try:
            for op, n, e in ops:
                if op == "turns":
                    for _ in range(n):
                        await asyncio.sleep(0)
                else:
                    assert e is not None
                    p = publishers[n % len(publishers)]
                    p.emit(e)
                    emitted[p.job_id].append(e)
            closes = [
                asyncio.create_task(p.close(final))
                for p, final in zip(publishers, finals, strict=True)
            ]
            # Every write here takes a few loop turns: one that has not ended in thousands
            # never will (a stall fails at once, and shrinks, rather than hang the run).
            for _ in range(STALL_TURNS):
                if all(close.done() for close in closes):
                    break
                await asyncio.sleep(0)
            assert all(close.done() for close in closes), "a close never returned"
            return [close.result() for close in closes]
        finally:
            await batcher.stop()

    with _instant_retries():
        closed = asyncio.run(scenario())

    assert not log.refused, "a batch was sent after its job's final event"
    _check_numbering(log)
    assert closed == [True] * len(jobs), "a close did not report its final event written"
    for job_id, final in zip(jobs, finals, strict=True):
        written = log.written[job_id]
        assert written and written[-1] == final, "the final event is not the last one"
        assert sum(map(ev.is_final, written)) == 1
        _check_stream(emitted[job_id], written[:-1])
    if any(log.failed):
        event("a write was retried")
    if log.acknowledged:
        event("a batch whose reply was lost was sent again")
    if len(log.requests) < sum(len(e) for e in emitted.values()):
        event("events shared a round trip")


def test_nothing_follows_a_batch_the_batcher_gave_up_on() -> None:
    """When a write fails past ``redis_patience_s`` the publisher fails; the events emitted
    while that write was out must not go out as the next batch once Redis answers: the
    stream would have a hole (here "a" lost, "b" written)."""
    log = _FakeLog([("lost", 3)])

    async def scenario() -> None:
        batcher = Batcher(cast(Any, log), redis_patience_s=0)  # gives up at once
        p = batcher.publisher("job", OWNER)
        try:
            p.emit(ev.Token("a"))
            await asyncio.sleep(0)  # batch 1 is out
            p.emit(ev.Token("b"))
            for _ in range(10):
                await asyncio.sleep(0)
            assert isinstance(p.error, RedisConnectionError)
        finally:
            await batcher.stop()

    with _instant_retries():
        asyncio.run(scenario())
    assert log.written["job"] == [], "written after a batch that never was"


def test_a_gather_window_merges_later_tokens_and_never_holds_a_first_token_or_a_final() -> None:
    """With TOKEN_GATHER_MS, tokens after a job's first wait for their followers (one
    append, one event, for many); the first token and the final event go at once."""
    log = _FakeLog([])
    gather_s = 0.2

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        batcher = Batcher(cast(Any, log), redis_patience_s=3600, gather_s=gather_s)
        publisher = batcher.publisher("job-0", OWNER)
        publisher.emit(ev.Token("first "))
        await asyncio.sleep(gather_s / 4)
        assert log.written["job-0"] == [ev.Token("first ")], "the first token waited"
        for n in range(5):
            publisher.emit(ev.Token(f"t{n} "))
            await asyncio.sleep(0.005)
        assert log.written["job-0"] == [ev.Token("first ")], "a later token did not wait"
        closed_at = loop.time()
        assert await publisher.close(ev.Done())
        assert loop.time() - closed_at < gather_s / 2, "the final event waited"
        await batcher.stop()

    asyncio.run(scenario())
    assert log.written["job-0"] == [
        ev.Token("first "),
        ev.Token("t0 t1 t2 t3 t4 "),
        ev.Done(),
    ]
    assert len(log.requests) == 2  # the first token; the rest with the final event


def test_a_write_takes_every_jobs_pending_tokens_so_a_worker_writes_once_a_window() -> None:
    """Held streams (a token a second each, thousands of jobs): each job's window ends at a
    different time, yet a worker sends one write per window, not one per job."""
    log = _FakeLog([])
    gather_s = 0.2

    async def scenario() -> None:
        batcher = Batcher(cast(Any, log), redis_patience_s=3600, gather_s=gather_s)
        publishers = [batcher.publisher(f"job-{n}", OWNER) for n in range(20)]
        for p in publishers:
            p.emit(ev.Token("first "))
        await asyncio.sleep(gather_s / 4)
        assert len(log.requests) == 1, "the first tokens went one write each"
        for p in publishers:  # the later tokens, their windows ending one after another
            p.emit(ev.Token("later "))
            await asyncio.sleep(gather_s / 40)
        await asyncio.sleep(gather_s * 1.5)
        assert len(log.requests) == 2, f"{len(log.requests) - 1} writes for one window"
        newcomer = batcher.publisher("job-new", OWNER)
        publishers[0].emit(ev.Token("waiting "))
        newcomer.emit(ev.Token("first "))  # goes at once, and takes job-0's token along
        await asyncio.sleep(gather_s / 4)
        assert log.requests[-1] == [
            ("job-0", 3, [ev.Token("waiting ")]),
            ("job-new", 1, [ev.Token("first ")]),
        ]
        await batcher.stop()

    asyncio.run(scenario())
    assert all(
        log.written[f"job-{n}"] == [ev.Token("first "), ev.Token("later ")] for n in range(1, 20)
    )


def test_a_lone_job_never_waits_below_the_gather_threshold() -> None:
    """GATHER_FROM_STREAMS: with fewer jobs running, Redis is idle and latency is all that
    counts; once enough run, later tokens wait for their followers."""
    log = _FakeLog([])
    gather_s = 0.2

    async def scenario() -> None:
        running = 1
        batcher = Batcher(
            cast(Any, log),
            redis_patience_s=3600,
            gather_s=gather_s,
            gather_from=2,
            running=lambda: running,
        )
        alone = batcher.publisher("alone", OWNER)
        alone.emit(ev.Token("first "))
        await asyncio.sleep(gather_s / 10)
        alone.emit(ev.Token("second "))
        await asyncio.sleep(gather_s / 10)
        assert log.written["alone"] == [ev.Token("first "), ev.Token("second ")], "it waited"
        running = 2  # two jobs now: the window applies
        other = batcher.publisher("other", OWNER)
        other.emit(ev.Token("first "))
        await asyncio.sleep(gather_s / 10)
        alone.emit(ev.Token("third "))
        await asyncio.sleep(gather_s / 10)
        assert log.written["alone"][-1] == ev.Token("second "), "a later token did not wait"
        await asyncio.sleep(gather_s)
        assert log.written["alone"][-1] == ev.Token("third ")
        await batcher.stop()

    asyncio.run(scenario())
