"""Faults injected into real processes: killed workers and gateways, Redis restarts,
missing workers, dropped and slow clients, shutdowns. The promise: no token lost or seen
twice, and no client left hanging."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from shared import events as ev
from shared import keys

from . import sse
from .harness import RedisServer, Stack, private_db, wait_until

pytestmark = pytest.mark.slow

LOST_TIMEOUT = 3.0  # WORKER_LOST_TIMEOUT_S in the test stacks
LONG = "".join(f"t{i} " for i in range(100))


class Background:
    """A stream read in a thread, so the test can break things while it flows."""

    def __init__(self, url: str, params: dict[str, str] | None = None) -> None:
        self.result: sse.Stream | None = None
        self.error: BaseException | None = None
        self._received = b""  # what has reached the reader so far
        self._thread = threading.Thread(target=self._run, args=(url, params), daemon=True)
        self._thread.start()

    def _run(self, url: str, params: dict[str, str] | None) -> None:
        try:
            with httpx.Client(timeout=60) as client:
                self.result = sse.read(client, url, params=params, on_chunk=self._got)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _got(self, chunk: bytes) -> None:
        self._received += chunk

    def job_id(self) -> str:
        """The job's id, from its first event (``queued``): call once a token has come."""
        first = self._received.split(b"data: ", 1)[1].split(b"\n", 1)[0]
        job_id: str = json.loads(first)["job_id"]
        return job_id

    def tokens(self) -> int:
        """Token events the reader has received whole so far."""
        received = self._received
        return received[: received.rfind(b"\n\n") + 2].count(b'"token":')

    def wait_tokens(self, count: int = 1, timeout: float = 30) -> None:
        """Wait until ``count`` tokens have reached the reader: the stream is flowing."""
        wait_until(
            lambda: self.tokens() >= count or not self._thread.is_alive(),
            timeout,
            f"{count} tokens to reach the reader",
        )
        assert self.tokens() >= count, f"the stream ended first: {self.error or self.result}"

    def join(self, timeout: float = 60) -> sse.Stream:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream hangs"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def post(client: httpx.Client, stack: Stack, prompt: str) -> str:
    response = client.post(stack.gateway.url + "/chat", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def worker_running(stack: Stack, job_id: str) -> int:
    """Which worker runs the job, once its claim has run: the worker logs the job id when
    it takes it, which may be before its claim reaches Redis, and a worker killed before
    that never owned the job (it waits in the queue for another)."""
    found: list[int] = []

    def claimed() -> bool:
        found[:] = [i for i, w in enumerate(stack.workers) if job_id in w.log()]
        started = {"lifecycle": "started", "job_id": job_id} in redis_events(stack, job_id)
        return bool(found) and started

    wait_until(claimed, 10, f"a worker to claim {job_id}")
    return found[0]


def test_killed_worker_mid_stream_ends_with_an_error_in_time(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=2)
    job_id = post(client, stack, "[long 1000] [delay 0.02]")
    head = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events", stop_after=10)
    victim = worker_running(stack, job_id)
    stack.workers[victim].kill()
    killed_at = time.monotonic()
    rest = sse.read(
        client,
        f"{stack.gateway.url}/chat/{job_id}/events",
        headers={"Last-Event-ID": head.last_id},
    )
    assert time.monotonic() - killed_at < LOST_TIMEOUT + 2
    assert rest.events[-1] == {"error": ev.WORKER_LOST}
    assert len(rest.finals) == 1
    text = head.text + rest.text
    assert LONG.startswith(text[: len(LONG)]) or "".join(f"t{i} " for i in range(1000)).startswith(
        text
    ), "tokens were repeated or reordered"
    # The survivor takes new work.
    again = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 100]"})
    assert again.text == LONG
    assert sse.is_done(again.events[-1])


def test_worker_killed_before_any_output_is_replaced_transparently(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=2)
    job_id = post(client, stack, "[long 100] [wait 1.5]")
    victim = worker_running(stack, job_id)
    stack.workers[victim].kill()
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.text == LONG, stream.events
    assert [e.get("lifecycle") for e in stream.events if "lifecycle" in e] == [
        "queued",
        "started",
        "done",
    ]


def test_the_only_worker_killed_before_any_output_ends_the_job_in_time(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    """No worker is left to run it again: the client hears within WORKER_LOST_TIMEOUT_S,
    not once QUEUE_TIMEOUT_S has passed with the job queued again."""
    stack = make_stack(workers=1, QUEUE_TIMEOUT_S="60")
    job_id = post(client, stack, "[long 100] [wait 30]")
    stack.workers[worker_running(stack, job_id)].kill()
    killed_at = time.monotonic()
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert time.monotonic() - killed_at < LOST_TIMEOUT + 2
    assert stream.events[-1] == {"error": ev.WORKER_LOST}
    assert stream.text == ""


def test_killed_gateway_client_resumes_on_another_exactly(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(gateways=2)
    first, second = stack.gateways
    reader = Background(first.url + "/chat", {"prompt": "[hard] [delay 0.3]"})
    reader.wait_tokens(3)  # mid-stream, among the hard tokens (17, 0.3 s apart)
    first.kill()
    # The kill cut the stream: keep what arrived whole, resume from its last cursor.
    partial = reader.join(10)
    assert partial.messages and not partial.finals
    rest = sse.read(client, second.url + "/chat", headers={"Last-Event-ID": partial.last_id})
    assert sse.is_done(rest.events[-1])
    job_id = partial.events[0]["job_id"]
    whole = sse.read(client, f"{second.url}/chat/{job_id}/events")
    assert partial.text + rest.text == whole.text
    assert "😀" in whole.text


def test_a_gateway_sigterm_closes_streams_for_clients_to_resume(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(gateways=2)
    first, second = stack.gateways
    background = Background(first.url + "/chat", {"prompt": "[long 100] [delay 0.05]"})
    background.wait_tokens()
    first.kill(signal.SIGTERM)
    stopped_at = time.monotonic()
    partial = background.join(10)
    assert time.monotonic() - stopped_at < 3
    assert not partial.finals
    rest = sse.read(client, second.url + "/chat", headers={"Last-Event-ID": partial.last_id})
    assert partial.text + rest.text == LONG
    # uvicorn re-raises SIGTERM once it has shut down cleanly.
    assert first.proc is not None
    try:
        assert first.proc.wait(10) in (0, -signal.SIGTERM)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway still runs 10 s after SIGTERM:\n{first.log()[-3000:]}")
    assert "Finished server process" in first.log()
    assert "without completing response" not in first.log()  # ended, not cut off


def test_a_worker_sigterm_lets_the_running_job_finish(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(SHUTDOWN_GRACE_S="6")
    background = Background(stack.gateway.url + "/chat", {"prompt": "[long 100] [delay 0.03]"})
    background.wait_tokens()  # the job runs and has streamed output: it must not be cut
    stack.workers[0].kill(signal.SIGTERM)
    stream = background.join(20)
    assert stream.text == LONG
    assert sse.is_done(stream.events[-1])
    assert stack.workers[0].proc is not None and stack.workers[0].proc.wait(10) == 0


def test_dropped_client_reconnects_with_exact_text_and_one_upstream_request(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack()
    params = {"prompt": "[long 100] [delay 0.02]"}
    head = sse.read(client, stack.gateway.url + "/chat", params=params, stop_after=20)
    # Gone for a while, less than DISCONNECT_GRACE_S (2 s): a fixed gap is the point here.
    time.sleep(0.5)
    rest = sse.read(
        client, stack.gateway.url + "/chat", params=params, headers={"Last-Event-ID": head.last_id}
    )
    assert head.text + rest.text == LONG
    assert stack.llm_stats()["requests"] == 1


def test_a_get_job_nobody_reads_is_cancelled_after_the_grace(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(DISCONNECT_GRACE_S="1.5")
    head = sse.read(
        client,
        stack.gateway.url + "/chat",
        params={"prompt": "[long 1000] [delay 0.02]"},
        stop_after=5,
    )
    job_id = head.events[0]["job_id"]
    wait_until(lambda: stack.llm_stats()["closed_early"] == 1, 4, "the upstream to close")
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.events[-1] == {"error": ev.CLIENT_GONE}


def test_a_get_job_read_for_longer_than_its_grace_is_marked_read_at_once_and_ends_done(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    """``create`` gives a GET job's ``watched`` key just the grace; the gateway relaying it
    renews it within a tick (not at its next renewal of all, half a grace away), so a reader
    that stays is never taken for gone."""
    stack = make_stack(DISCONNECT_GRACE_S="3")
    grace_ms = 3000
    reader = Background(stack.gateway.url + "/chat", {"prompt": "[long 100] [delay 0.05]"})
    reader.wait_tokens()
    job_id = reader.job_id()
    watched = keys.watched_key(job_id)
    wait_until(lambda: redis_pttl(stack, watched) > grace_ms, 1.5, "the job marked read")
    stream = reader.join(30)
    assert sse.is_done(stream.events[-1])
    assert stream.text == LONG


def test_a_post_job_runs_to_its_end_unread(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(DISCONNECT_GRACE_S="1")
    job_id = post(client, stack, "[long 100] [delay 0.03]")
    # Nobody reads it for its whole run (3 s of tokens, three times the grace) and it ends.
    wait_until(lambda: sse.is_final(redis_events(stack, job_id)[-1]), 20, "the job's end")
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.text == LONG
    assert sse.is_done(stream.events[-1])


def test_no_worker_means_an_error_in_time_and_the_job_never_runs(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=0, QUEUE_TIMEOUT_S="2")
    started = time.monotonic()
    stream = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "hello"})
    assert stream.events[-1] == {"error": ev.NO_WORKER}
    assert time.monotonic() - started < 2 + 2
    stack.add_worker()
    refused(stack, stream.events[0]["job_id"])
    time.sleep(2)  # and no request reaches the model for a while after: a fixed gap
    assert stack.llm_stats()["requests"] == 0


def test_a_posted_job_no_worker_started_never_runs(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=0, QUEUE_TIMEOUT_S="1")
    job_id = post(client, stack, "hello")
    # QUEUE_TIMEOUT_S runs out (on Redis's clock, the one the claim reads) with no worker.
    wait_until(lambda: not redis_exists(stack, keys.deadline_key(job_id)), 10, "the timeout")
    stack.add_worker()
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.events[-1] == {"error": ev.NO_WORKER}
    refused(stack, job_id)
    time.sleep(1)  # and no request reaches the model for a while after: a fixed gap
    assert stack.llm_stats()["requests"] == 0


def test_redis_restart_mid_stream(
    own_redis: RedisServer, logdir: Path, client: httpx.Client
) -> None:
    stack = Stack(own_redis.url, logdir).start()
    try:
        background = Background(stack.gateway.url + "/chat", {"prompt": "[long 1000] [delay 0.02]"})
        background.wait_tokens()
        own_redis.stop()
        down_at = time.monotonic()
        ready = client.get(stack.gateway.url + "/readyz")
        assert ready.status_code == 503
        refused = client.get(stack.gateway.url + "/chat", params={"prompt": "hi"})
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert "Redis" in refused.json()["error"]
        assert time.monotonic() - down_at < 5, "503 must come within seconds"
        own_redis.start()  # empty: the job in flight is gone
        stream = background.join(20)
        assert stream.events[-1] == {"error": ev.JOB_LOST}
        assert len(stream.finals) == 1
        # A reconnect finds nothing to resume.
        gone = client.get(stack.gateway.url + "/chat", headers={"Last-Event-ID": stream.last_id})
        assert gone.status_code == 404
        # New chats work with no process restarted.
        wait_until(
            lambda: client.get(stack.gateway.url + "/readyz").status_code == 200, 10, "readiness"
        )
        again = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 100]"})
        assert again.text == LONG
        assert sse.is_done(again.events[-1])
    finally:
        stack.stop()


def test_a_reader_cut_off_by_a_hung_redis_gets_a_final_error_and_may_resume_before_it(
    own_redis: RedisServer, logdir: Path, client: httpx.Client
) -> None:
    """The error a gateway sends when Redis stops answering is final for its reader:
    nothing follows it, and a reconnect with its cursor (no entry of the job's, unique
    within it) gets 204 as one with a final event's would. A reader that resumes from the
    event before it, once Redis answers, gets exactly the job's events after that one.
    The error comes WORKER_LOST_TIMEOUT_S after Redis stopped answering: a hung Redis is
    found only once a read's deadline (10 s) ends, and that wait counts."""
    stack = Stack(own_redis.url, logdir, {"WORKER_LOST_TIMEOUT_S": "12"}).start()
    try:
        background = Background(stack.gateway.url + "/chat", {"prompt": "[long 400] [delay 0.02]"})
        background.wait_tokens()
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            cut = background.join(40)
            took = time.monotonic() - stopped_at
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert "Redis" in cut.events[-1]["error"], cut.events[-1]
        assert 10 < took < 13.5, took
        assert cut.last_id.endswith("~") and len(cut.finals) == 1
        again = client.get(stack.gateway.url + "/chat", headers={"Last-Event-ID": cut.last_id})
        assert again.status_code == 204, again.text
        before = cut.messages[-2].id  # the last event of the job's own
        rest = sse.read(client, stack.gateway.url + "/chat", headers={"Last-Event-ID": before})
        assert rest.events and len(rest.finals) == 1, rest.events
        # Nothing lost or repeated at the seam (the job then went on, or ended as lost).
        whole = "".join(f"t{i} " for i in range(400))
        assert cut.text + rest.text == whole[: len(cut.text + rest.text)]
    finally:
        stack.stop()


def test_a_post_whose_create_a_hung_redis_never_answered_does_not_run_when_it_wakes(
    own_redis: RedisServer, logdir: Path, client: httpx.Client
) -> None:
    """A Redis that hangs answers no create: its client gets a 503, and may send the chat
    again. The create waited in the Redis' socket and ran once it woke: the job ran, and
    was paid for, for nobody. Run past the time its gateway waited for, it writes nothing."""
    stack = Stack(own_redis.url, logdir).start()
    try:
        first = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "hi"})
        assert sse.ends_done(first)
        woken = redis.Redis.from_url(own_redis.url, decode_responses=True)
        before = set(woken.keys("sg:*:meta"))
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            refused = client.post(
                stack.gateway.url + "/chat", json={"prompt": "[long 5]"}, timeout=30
            )
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert refused.status_code == 503, refused.text
        time.sleep(2)  # the create ran, if it was to, and a worker took the job
        assert set(woken.keys("sg:*:meta")) == before
        again = client.post(stack.gateway.url + "/chat", json={"prompt": "[long 5]"})
        assert again.status_code == 202, again.text  # a create on time is run, as ever
    finally:
        stack.stop()


def test_200_streams_each_read_twice_arrive_exactly(redis_url: str, logdir: Path) -> None:
    stack = Stack(private_db(redis_url), logdir, {"QUEUE_TIMEOUT_S": "60"}).start(workers=2)
    expected = "".join(f"t{i} " for i in range(50))

    async def one(client: httpx.AsyncClient) -> None:
        response = await client.post(
            stack.gateway.url + "/chat", json={"prompt": "[long 50] [delay 0.02]"}
        )
        job_id = response.json()["job_id"]
        url = f"{stack.gateway.url}/chat/{job_id}/events"
        first, second = await asyncio.gather(sse.aread(client, url), sse.aread(client, url))
        for stream in (first, second):
            assert stream.text == expected
            assert sse.is_done(stream.events[-1])
            assert len(stream.finals) == 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await asyncio.gather(*(one(client) for _ in range(200)))

    try:
        asyncio.run(main())
    finally:
        stack.stop()


def test_a_worker_stopped_before_any_output_hands_the_job_to_another(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=2, SHUTDOWN_GRACE_S="0.5")
    job_id = post(client, stack, "[long 100] [wait 1.2]")
    victim = worker_running(stack, job_id)
    stack.workers[victim].kill(signal.SIGTERM)
    stream = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
    assert stream.text == LONG, (stream.status, stream.events)
    assert [e.get("lifecycle") for e in stream.events if "lifecycle" in e] == [
        "queued",
        "started",
        "done",
    ]
    assert "handed back" in stack.workers[victim].log()


def test_an_unread_post_job_whose_worker_dies_still_ends_in_time(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(workers=2)
    job_id = post(client, stack, "[long 1000] [delay 0.02]")
    victim = worker_running(stack, job_id)
    # Some output, and nobody reading.
    wait_until(lambda: any("token" in e for e in redis_events(stack, job_id)), 30, "output")
    stack.workers[victim].kill()
    # The end is written without any reader, within WORKER_LOST_TIMEOUT_S (and a margin).
    wait_until(
        lambda: sse.is_final(redis_events(stack, job_id)[-1]),
        LOST_TIMEOUT + 0.5,
        "the end within WORKER_LOST_TIMEOUT_S",
    )
    # Read only now.
    raw = redis_events(stack, job_id)
    assert raw[-1] == {"error": ev.WORKER_LOST}


def test_a_get_job_left_while_queued_never_reaches_the_model(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    # A long queue timeout: the job must end for want of a reader, not of a worker.
    stack = make_stack(workers=0, DISCONNECT_GRACE_S="1", QUEUE_TIMEOUT_S="60")
    head = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "hello"}, stop_after=1)
    job_id = head.events[0]["job_id"]
    # The grace runs out while the job waits for a worker: the key standing for its reader,
    # set to DISCONNECT_GRACE_S when the reader left, lapses (on Redis's clock).
    wait_until(
        lambda: not redis_exists(stack, keys.watched_key(job_id)), 10, "the grace to run out"
    )
    stack.add_worker()
    wait_until(lambda: bool(redis_events(stack, job_id)[-1].get("error")), 5, "the end")
    assert redis_events(stack, job_id)[-1] == {"error": ev.CLIENT_GONE}
    assert stack.llm_stats()["requests"] == 0


@contextmanager
def stack_redis(stack: Stack) -> Iterator[redis.Redis]:
    """A client of the stack's Redis, closed after."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        client.close()


def redis_events(stack: Stack, job_id: str) -> list[dict[str, object]]:
    with stack_redis(stack) as client:
        return [ev.decode(f[b"d"]) for _, f in client.xrange(keys.events_key(job_id))]


def redis_pttl(stack: Stack, key: str) -> int:
    with stack_redis(stack) as client:
        return int(client.pttl(key))


def redis_exists(stack: Stack, key: str) -> bool:
    with stack_redis(stack) as client:
        return bool(client.exists(key))


def refused(stack: Stack, job_id: str) -> None:
    """Wait until a worker has taken the job's wake-up (or found it by its poll) and its
    claim said no: the worker is done with it."""
    said = f"job {job_id} not run: "
    wait_until(
        lambda: any(said in w.log() for w in stack.workers), 30, f"a worker to refuse {job_id}"
    )


def test_a_job_past_its_timeout_ends_saying_so_logged_and_counted(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    stack = make_stack(JOB_TIMEOUT_S="2")
    started = time.monotonic()
    stream = sse.read(
        client, stack.gateway.url + "/chat", params={"prompt": "[long 400] [delay 0.05]"}
    )
    assert time.monotonic() - started < 10
    assert stream.text  # it had answered in part: not run again
    [final] = stream.finals
    assert "JOB_TIMEOUT_S (2 s)" in final["error"]
    [worker] = stack.workers
    assert "ran past JOB_TIMEOUT_S" in worker.log()
    metrics = httpx.get(f"http://127.0.0.1:{worker.env['METRICS_PORT']}/metrics").text
    assert 'streamgate_jobs_total{outcome="timeout"} 1.0' in metrics


def test_a_get_job_read_on_one_gateway_survives_its_reader_on_another_leaving(
    make_stack: Callable[..., Stack], client: httpx.Client
) -> None:
    """Any number of readers at once, on any gateways: when one gateway's last reader of a
    job leaves, that gateway sets ``watched`` to exactly the grace, but the job is still
    read on another gateway and must not be cancelled. Gateway 0 renews ``watched`` every
    half grace, at its due time, so a grace set just after one renewal is renewed again
    before it lapses (renewing once a grace, it lapsed and the worker's readers check,
    every grace/3, cancelled the job)."""
    # A grace of 3.05 s: gateway 0 renews all every 1.525 s. Renewing every grace (at the
    # first 1 s step past 3.05 s: 4 s), a grace set just after a renewal was missing for
    # ~0.9 s, and the worker asks every ~1 s.
    stack = make_stack(gateways=2, DISCONNECT_GRACE_S="3.05", WORKER_LOST_TIMEOUT_S="4")
    stayer = Background(stack.gateways[0].url + "/chat", {"prompt": "[long 200] [delay 0.05]"})
    stayer.wait_tokens()
    job_id = stayer.job_id()
    watched = keys.watched_key(job_id)
    with stack_redis(stack) as r:
        # Wait for gateway 0's renewal of all (a jump of the key's TTL; the first jump,
        # the mark of the job it began to relay, may have come already).
        wait_until(lambda: r.pttl(watched) > 3050, 2, "the job marked read")
        previous = r.pttl(watched)
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, "no renewal seen"
            now = r.pttl(watched)
            if now > previous + 200:
                break
            previous = now
            time.sleep(0.005)
        # Right after it, a reader of the job on gateway 1 comes and goes.
        url = f"{stack.gateways[1].url}/chat/{job_id}/events"
        with httpx.stream("GET", url, timeout=10) as response:
            next(response.iter_bytes())
        missing_at = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and missing_at is None:
            if not r.exists(watched):
                missing_at = time.monotonic()
            time.sleep(0.01)
    stream = stayer.join(30)
    assert sse.is_done(stream.events[-1]), f"{stream.events[-1]}, watched missing: {missing_at}"
    assert missing_at is None, "watched lapsed while gateway 0 still relays the job"
