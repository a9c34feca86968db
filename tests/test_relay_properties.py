"""Properties of the relay's fan-out (gateway/relay.py) and of a reader's mailbox
(gateway/reader.py), over any interleaving of what the read loop, Redis and clients do.

The real ``Relay``, ``_Job`` and ``Reader`` are driven with no Redis: the test plays the
read loop (a read starts at ``job.cursor()``; its reply is the entries after that cursor,
as many as it holds, fed to ``_deliver``) and the clients (each drains its reader through
``frames_until_end``, when the test lets it). Between a read's start and its reply anything
may happen: entries arrive, readers join (behind the read or ahead of it), drain or leave.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import anyio
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.metrics import GatewayMetrics
from gateway.reader import Reader, entry_key
from gateway.relay import Relay, _Job
from shared import keys
from shared.cursors import START
from shared.keys import Keys
from shared.settings import Settings

JOB = "0123456789abcdef0123456789abcdef"
KEY = keys.events_key(JOB).encode()
NEVER_S = 3600.0  # no ping while a test runs: every chunk is frames
STEPS = 2  # loop turns that let a client's pending read finish
SETTINGS = Settings()  # once: reading the environment costs more than an example

Entry = tuple[bytes, list[bytes]]  # as XREAD's raw reply has it


class _Pipeline:
    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def xadd(self, *_: object, **__: object) -> None:
        return None

    def expire(self, *_: object) -> None:
        return None

    async def execute(self) -> list[Any]:
        return []


class _StubRedis:
    """What the relay touches outside its read loop (the wake, the grace, ``stop``)."""

    def __init__(self) -> None:
        self.connection_pool = SimpleNamespace(connection_kwargs={})  # for HeldConnection

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline()

    async def set(self, *_: object, **__: object) -> bool:
        return True

    async def delete(self, *_: object) -> int:
        return 0


@st.composite
def _streams(draw: st.DrawFn) -> list[Entry]:
    """A job's stream: ids that order as numbers, not as text (9-0 < 10-0, 1-9 < 1-10),
    frames small and large (past the byte bound alone), the last one final."""
    count = draw(st.integers(1, 20))
    ms = draw(st.sampled_from([1, 8, 99, 1_700_000_000_000]))
    seq = draw(st.sampled_from([0, 7]))
    entries: list[Entry] = []
    for i in range(count):
        if i and draw(st.booleans()):
            ms, seq = ms + draw(st.integers(1, 3)), 0
        elif i:
            seq += 1
        if i == count - 1:
            entries.append((b"%d-%d" % (ms, seq), [b"d", b'{"lifecycle":"done"}', b"f", b"1"]))
        else:
            pad = b"x" * draw(st.sampled_from([0, 30, 1500, 5000]))
            entries.append((b"%d-%d" % (ms, seq), [b"d", b'{"token":"%d%s"}' % (i, pad)]))
    return entries


async def _next_chunk(frames: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(frames)
    except StopAsyncIteration:
        return None


def _ids(chunk: bytes) -> list[bytes]:
    """The entry ids of a chunk of frames, ``id: <job>_<entry id>\\ndata: ...\\n\\n`` each."""
    prefix = b"id: " + JOB.encode() + b"_"
    ids = []
    for frame in chunk.split(b"\n\n")[:-1]:
        head, _, _ = frame.partition(b"\n")
        assert head.startswith(prefix), frame
        ids.append(head.removeprefix(prefix))
    return ids


class _Client:
    """One SSE response: its reader, drained only when the test steps it (a slow client
    is one the test leaves alone)."""

    def __init__(self, relay: Relay, start: bytes, new_chat: bool) -> None:
        self.relay = relay
        self.start = entry_key(start)
        self.reader = relay.subscribe(JOB, start.decode(), new_chat)
        frames = self.reader.frames_until_end(NEVER_S)
        self.frames = cast(AsyncGenerator[bytes, None], frames)  # closed if the client leaves
        self.pending: asyncio.Task[bytes | None] | None = None
        self.got: list[bytes] = []
        self.done = False  # took the final event; its response has ended
        self.left = False  # went away before the end

    async def step(self) -> None:
        """Ask for the next chunk (which sends the last one: a paused reader resumes) and
        take it if it comes at once; else the request stays out, woken by a push."""
        if self.done or self.left:
            return
        if self.pending is None:
            self.pending = asyncio.create_task(_next_chunk(self.frames))
        await _turns()
        if self.pending.done():
            chunk, self.pending = self.pending.result(), None
            if chunk is None:
                self.done = True
                self.relay.unsubscribe(self.reader)
            else:
                self.got += _ids(chunk)

    async def leave(self) -> None:
        if self.done or self.left:
            return
        if self.pending is not None:
            self.pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pending
        await self.frames.aclose()
        self.relay.unsubscribe(self.reader)
        self.left = True


async def _turns() -> None:
    for _ in range(STEPS):
        await asyncio.sleep(0)


def _check_mailbox(reader: Reader) -> None:
    """At most ``bound`` frames, and under ``bound_bytes`` before its last frame."""
    assert len(reader.frames) <= reader.bound
    assert reader.pending_bytes == sum(map(len, reader.frames))
    assert sum(map(len, reader.frames[:-1])) < reader.bound_bytes
    if reader.frames and not reader.ended:
        full = len(reader.frames) >= reader.bound or reader.pending_bytes >= reader.bound_bytes
        assert reader.paused == full


def _note_coverage(job: _Job | None) -> None:
    """Name the cases a reply meets (pytest --hypothesis-show-statistics counts them)."""
    if job is None:
        event("a reply for a job whose readers all left")
    elif job.read_from is None:
        event("a reply for a job whose readers all left, and that has a new one")
    else:
        if any(r.after < job.read_from for r in job.readers):
            event("a reply meets a reader behind its start (joined or resumed mid-read)")
        if any(r.after > job.read_from for r in job.readers):
            event("a reply meets a reader ahead of its start")
        if any(r.paused for r in job.readers):
            event("a reply meets a paused reader")


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["arrive", "subscribe", "wake", "reply", "step", "leave", "ring", "ring", "ring"]
        ),
        st.integers(0, 40),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    stream=_streams(),
    actions=_ACTIONS,
    bound=st.integers(1, 5),
    bound_bytes=st.sampled_from([4096, 1 << 20]),
)
def test_every_reader_gets_each_entry_after_its_cursor_once_in_order_up_to_the_final(
    stream: list[Entry], actions: list[tuple[str, int]], bound: int, bound_bytes: int
) -> None:
    ids = [entry_id for entry_id, _ in stream]

    async def scenario() -> None:
        relay = Relay(
            cast(Any, _StubRedis()),
            cast(Any, _StubRedis()),
            cast(Any, SimpleNamespace(keys=Keys())),  # the event log: its key names
            SETTINGS.model_copy(
                update={"relay_buffer_events": bound, "relay_buffer_bytes": bound_bytes}
            ),
            GatewayMetrics(),
            anyio.Event(),
        )
        arrived = 0  # entries in Redis so far
        in_flight: tuple[int, int] | None = None  # the start of the read in flight
        clients: list[_Client] = []
        # Doorbell entries not yet read, one per write: what a worker's write rings (the
        # entry before it and the entries it added), or the stream's name alone (a write of
        # the gateway's, or the first); a doorbell that lapsed rings nothing.
        rung: list[list[bytes]] = []

        def write(upto: int, how: int) -> None:
            nonlocal arrived
            before, arrived = arrived, upto
            if how % 4 == 3 or before == arrived:
                return  # unrung: only a read finds it
            if how % 4 == 2 or before == 0:
                rung.append([b"k", KEY])
                return
            group = [b"k", KEY, b"p", stream[before - 1][0]]
            for entry_id, fields in stream[before:arrived]:
                group += [b"i", entry_id, *fields]
            rung.append(group)

        def start_read() -> None:
            nonlocal in_flight
            job = relay.jobs.get(JOB)
            cursor = job.cursor() if job is not None else None
            if job is not None:
                waiting = [r.after for r in job.readers if not r.paused]
                if waiting:
                    assert cursor is not None, "a reader waits, yet its job is not read"
                    assert entry_key(cursor) <= min(waiting), "the read skips a reader's entries"
                else:
                    assert cursor is None, "a job with every reader paused is read"
            in_flight = entry_key(cursor) if cursor is not None else None
            relay._fresh.discard(JOB)  # this read covers the job

        def reply(count: int) -> None:
            """The read in flight returns up to ``count`` entries after its start (none: it
            was woken, by a new reader or a drained one), and the loop starts the next."""
            nonlocal in_flight
            if in_flight is not None:
                after = [e for e in stream[:arrived] if entry_key(e[0]) > in_flight][:count]
                if after:  # else XREAD's reply does not name the stream
                    _note_coverage(relay.jobs.get(JOB))
                    relay._deliver(JOB, after)
                for client in clients:
                    _check_mailbox(client.reader)
            start_read()

        for action, n in actions:
            if action == "arrive":
                write(min(len(stream), arrived + 1 + n % 3), n // 3)
            elif action == "ring" and rung:
                relay._rung(rung.pop(0))
                for client in clients:
                    _check_mailbox(client.reader)
            elif action == "subscribe":
                # A client resumes from START or from an entry it was sent, never the final
                # (the gateway answers that cursor with 204, without a reader).
                cursors = [START.encode(), *ids[: min(arrived, len(ids) - 1)]]
                clients.append(_Client(relay, cursors[n % len(cursors)], new_chat=n % 2 == 0))
            elif action == "wake":
                reply(0)
            elif action == "reply":
                reply(1 + n % 5)
            elif clients and action == "step":
                await clients[n % len(clients)].step()
            elif clients and action == "leave":
                await clients[n % len(clients)].leave()
            await _turns()

        # Then the job runs to its end, every client drains, and the loop reads on.
        write(len(stream), 0)
        for _ in range(4 * len(stream) + 10):
            if all(c.done or c.left for c in clients):
                break
            for client in clients:
                await client.step()
            reply(len(stream))
            await _turns()

        for client in clients:
            expected = [i for i in ids if entry_key(i) > client.start]
            if client.left:
                assert client.got == expected[: len(client.got)]
            else:
                assert client.done, f"a reader from {client.start} stuck after {client.got}"
                assert client.got == expected
        assert JOB not in relay.jobs and relay.open_readers == 0
        await relay.stop()

    asyncio.run(scenario())


_MAILBOX_OPS = st.lists(
    st.tuples(st.sampled_from(["push", "push", "step"]), st.integers(1, 80), st.integers(0, 9)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=_MAILBOX_OPS, bound=st.integers(1, 6), bound_bytes=st.integers(1, 200))
def test_a_mailbox_is_bounded_pauses_when_full_and_resumes_once_its_chunk_is_sent(
    ops: list[tuple[str, int, int]], bound: int, bound_bytes: int
) -> None:
    async def scenario() -> None:
        drained: list[Reader] = []
        reader = Reader(JOB, START, bound, None, bound_bytes=bound_bytes, on_drained=drained.append)
        frames = cast(AsyncGenerator[bytes, None], reader.frames_until_end(NEVER_S))
        pending: asyncio.Task[bytes | None] | None = None
        accepted: list[bytes] = []
        taken = b""
        pauses = 0
        for position, (op, size, one_in_ten) in enumerate(ops, 1):
            if op == "push":
                final = one_in_ten == 0
                frame = b"%d:" % position + b"x" * size
                takes = not reader.paused and not reader.ended
                assert reader.push(frame, (position, 0), final) == takes
                if takes:
                    accepted.append(frame)
                    assert reader.after == (position, 0) and reader.finished == final
                    pauses += reader.paused
                _check_mailbox(reader)
            else:
                if pending is None:
                    pending = asyncio.create_task(_next_chunk(frames))
                await _turns()
                if pending.done():
                    chunk, pending = pending.result(), None
                    if chunk is None:
                        assert reader.ended and not reader.frames
                    else:
                        taken += chunk
                    # A paused reader resumes once its chunk is sent (the client asks for
                    # the next one), never while it is out: one mailbox at a time.
                    assert len(drained) == (pauses - 1 if reader.paused else pauses)
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        await frames.aclose()
        everything = b"".join(accepted)
        assert taken + b"".join(reader.frames) == everything, "a frame lost, repeated or moved"
        assert drained == [reader] * len(drained)

    asyncio.run(scenario())


def test_a_doorbell_group_goes_to_readers_that_have_all_before_it_and_an_unreadable_one_reads() -> (
    None
):
    """A group (``p``, then its entries) is delivered to a reader at ``p``; a reader behind
    it, a stream named alone, or an entry this release cannot read has the stream read."""

    async def scenario() -> None:
        relay = Relay(
            cast(Any, _StubRedis()),
            cast(Any, _StubRedis()),
            cast(Any, SimpleNamespace(keys=Keys())),
            SETTINGS,
            GatewayMetrics(),
            anyio.Event(),
        )
        at = relay.subscribe(JOB, "5-0")
        relay._fresh.clear()  # as after the read that brought it to 5-0
        relay._take_rung([b"k", KEY, b"p", b"5-0", b"i", b"6-0", b"d", b'{"token":"a"}'])
        assert at.after == (6, 0) and JOB not in relay._fresh
        behind = relay.subscribe(JOB, "1-0")
        relay._fresh.clear()
        relay._take_rung([b"k", KEY, b"p", b"6-0", b"i", b"7-0", b"d", b'{"token":"b"}'])
        assert JOB in relay._fresh and at.after == (6, 0) and behind.after == (1, 0)
        relay.unsubscribe(behind)
        for unread in ([b"k", KEY], [b"k", KEY, b"p", b"not-an-id", b"i", b"7-0", b"d", b"{}"]):
            relay._fresh.clear()
            relay._take_rung(unread)
            assert JOB in relay._fresh and at.after == (6, 0)
        await relay.stop()

    asyncio.run(scenario())
