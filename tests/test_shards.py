"""Shards: three Redis servers as three shards, two gateways and two workers.

Chats spread over every shard and each job lives wholly in its own; a cursor resumes on
the other gateway; a session's jobs stay in its shard; one shard killed mid-stream fails
its own streams alone (an error within WORKER_LOST_TIMEOUT_S), new chats go to the others
at once, and its return brings it back into use.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from gateway.shards import Shard as GatewayShard
from shared import keys
from shared.cursors import new_job_id
from shared.held_connection import NotSent
from shared.redis_conn import sentinel_target
from shared.settings import Settings, load_settings
from shared.shards import home, shard_of
from shared.urls import split_urls

from . import sse
from .harness import FAST_ENV, RedisServer, Service, Stack, free_port, wait_until

SHARDS = 3


def test_redis_url_lists_shards_and_sentinel_urls_keep_their_commas() -> None:
    sentinel = "redis+sentinel://:pw@s1:26379,s2:26379/main/0"
    assert split_urls(f"redis://a:6379/0, {sentinel},rediss://c:6380/1") == [
        "redis://a:6379/0",
        sentinel,
        "rediss://c:6380/1",
    ]
    Settings(redis_url=f"redis://a:6379/0,{sentinel}")  # valid
    ipv6 = sentinel_target("redis+sentinel://[::1]:26379,s2:26380/main")
    assert ipv6 is not None and ipv6.sentinels == [("::1", 26379), ("s2", 26380)]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("redis://a:6379/0,redis://a:6379/0", "lists one Redis twice"),
        ("redis://a:6379/0,redis://:secret@b:x/0", "shard 1 (redis://:***@b:x/0)"),
        ("redis://a:6379/0,http://b:6379/0", "shard 1 (http://b:6379/0): must start with"),
        ("redis+cluster://a:7000,redis://b:6379/0", "names a Redis Cluster and other"),
        ("redis+cluster://a:7000?shards=0", "shards='0': must be a number from 1 to 256"),
        ("redis+cluster://a:x", "cluster node 'a:x' is not host:port"),
        ("redis+sentinel://s1:70000/main", "sentinel address 's1:70000' is not host:port"),
    ],
)
def test_a_bad_shard_url_is_named_by_its_place(
    value: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", value)
    with pytest.raises(SystemExit) as caught:
        load_settings()
    message = str(caught.value.code)
    assert "REDIS_URL: " in message and said in message
    assert "secret" not in message


def test_a_job_id_names_its_shard_and_names_hash_to_one_shard_everywhere() -> None:
    for shard in range(5):
        job_id = new_job_id(shard)
        assert len(job_id) == 32 and shard_of(job_id, 5) == shard
    # A one-Redis deployment's ids (any first digits) all stay in that Redis.
    assert {shard_of(new_job_id(200), 1), shard_of("ff" + "0" * 30, 1)} == {0}
    # Shards added at the end leave the ids of the first ones where they were.
    assert shard_of(new_job_id(2), 3) == shard_of(new_job_id(2), 7) == 2
    spread = {home(f"session-{n}", 3) for n in range(60)}
    assert spread == {0, 1, 2}
    assert home("session-1", 3) == home("session-1", 3)


class Shards:
    def __init__(self, servers: list[RedisServer], stack: Stack) -> None:
        self.servers = servers
        self.stack = stack

    def client(self, shard: int) -> redis.Redis:
        return redis.Redis.from_url(self.servers[shard].url)

    def names(self, shard: int, job_id: str) -> list[bytes]:
        """Every key of this shard whose name holds the job's id."""
        client = self.client(shard)
        try:
            return list(client.scan_iter(match=f"*{job_id}*"))
        finally:
            client.close()

    def holds(self, shard: int, job_id: str) -> bool:
        client = self.client(shard)
        try:
            return bool(client.exists(keys.events_key(job_id), keys.meta_key(job_id)) == 2)
        finally:
            client.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shards]:
    servers = [RedisServer(tmp_path_factory.mktemp(f"shard{n}")) for n in range(SHARDS)]
    for server in servers:
        server.start()
    logdir = tmp_path_factory.mktemp("logs")
    stack = Stack(",".join(s.url for s in servers), logdir).start(2, 2)
    yield Shards(servers, stack)
    stack.stop()
    for server in servers:
        server.stop()


def test_chats_spread_over_every_shard_and_each_job_lives_in_its_own(
    shards: Shards, client: httpx.Client
) -> None:
    stack = shards.stack
    job_ids = []
    for n in range(2 * SHARDS):
        gateway = stack.gateways[n % 2]
        created = client.post(gateway.url + "/chat", json={"prompt": "[long 5]"})
        assert created.status_code == 202, created.text
        job_ids.append(created.json()["job_id"])
    placed = [shard_of(job_id, SHARDS) for job_id in job_ids]
    assert sorted(set(placed)) == list(range(SHARDS))
    for job_id, shard in zip(job_ids, placed, strict=True):
        assert shards.holds(shard, job_id)
        assert not any(shards.holds(other, job_id) for other in range(SHARDS) if other != shard)
        # Any gateway reads any shard's job.
        for gateway in stack.gateways:
            done = sse.read(client, f"{gateway.url}/chat/{job_id}/events")
            assert sse.ends_done(done), done.events
            assert done.text == "".join(f"t{i} " for i in range(5))
    for job_id, shard in zip(job_ids, placed, strict=True):  # wholly: no key of it elsewhere
        assert shards.names(shard, job_id)
        assert not [k for o in range(SHARDS) if o != shard for k in shards.names(o, job_id)]


def test_a_cursor_resumes_on_the_other_gateway_whichever_shard_holds_the_job(
    shards: Shards, client: httpx.Client
) -> None:
    first, second = shards.stack.gateways
    seen_shards = set()
    for _ in range(2 * SHARDS):
        part = sse.read(
            client, first.url + "/chat", params={"prompt": "[long 40] [delay 0.01]"}, stop_after=5
        )
        job_id = part.events[0]["job_id"]
        seen_shards.add(shard_of(job_id, SHARDS))
        rest = sse.read(
            client, second.url + "/chat", params={}, headers={"Last-Event-ID": part.last_id}
        )
        assert sse.ends_done(rest), rest.events
        assert part.text + rest.text == "".join(f"t{i} " for i in range(40))
    assert len(seen_shards) > 1


def test_a_sessions_jobs_stay_in_its_shard_with_its_turns(
    shards: Shards, client: httpx.Client
) -> None:
    gateways = shards.stack.gateways
    for session in ("alpha", "beta", "gamma"):
        placed = set()
        for turn, gateway in enumerate(gateways):
            stream = sse.read(
                client,
                gateway.url + "/chat",
                params={"prompt": f"[echo] turn {turn}", "session": session},
            )
            assert sse.ends_done(stream), stream.events
            placed.add(shard_of(stream.events[0]["job_id"], SHARDS))
        assert placed == {home(session, SHARDS)}
        # The second turn was answered with the first in its history.
        assert "turn 0" in stream.text and "turn 1" in stream.text


def test_a_killed_shard_fails_its_own_streams_alone_and_comes_back(
    shards: Shards, client: httpx.Client
) -> None:
    stack = shards.stack
    gateway = stack.gateways[0]
    victim = 1
    # Long streams on every shard, read from both gateways.
    streams: dict[str, sse.Stream] = {}
    ended: dict[str, float] = {}
    flowing: dict[str, threading.Event] = {}
    readers = []
    for n in range(2 * SHARDS):
        created = client.post(
            stack.gateways[n % 2].url + "/chat", json={"prompt": "[long 400] [delay 0.02]"}
        )
        job_id = created.json()["job_id"]
        flowing[job_id] = threading.Event()

        def read(job_id: str = job_id, url: str = stack.gateways[n % 2].url) -> None:
            with httpx.Client(timeout=60) as own:
                streams[job_id] = sse.read(
                    own,
                    f"{url}/chat/{job_id}/events",
                    timeout=60,
                    on_chunk=lambda chunk: b'"token"' in chunk and flowing[job_id].set(),
                )
            ended[job_id] = time.monotonic()

        readers.append(threading.Thread(target=read))
        readers[-1].start()
    assert {shard_of(j, SHARDS) for j in flowing} == set(range(SHARDS))
    for job_id, event in flowing.items():
        assert event.wait(30), f"job {job_id} never streamed"

    shards.servers[victim].stop()
    killed = time.monotonic()
    # New chats go to the other shards at once, and answer.
    for _ in range(2 * SHARDS):
        stream = sse.read(client, gateway.url + "/chat", params={"prompt": "[long 3]"})
        assert sse.ends_done(stream), stream.events
        assert shard_of(stream.events[0]["job_id"], SHARDS) != victim
    ready = client.get(gateway.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["down"] == [shards.servers[victim].url]

    for thread in readers:
        thread.join(60)
    # The victim's readers hear within WORKER_LOST_TIMEOUT_S (and a read loop's retry).
    lost_within = float(FAST_ENV["WORKER_LOST_TIMEOUT_S"]) + 2
    for job_id, stream in streams.items():
        if shard_of(job_id, SHARDS) == victim:
            assert sse.is_final(stream.events[-1]) and "error" in stream.events[-1], stream.events
            assert "Redis" in stream.events[-1]["error"]
            assert ended[job_id] - killed < lost_within
        else:
            assert sse.ends_done(stream), stream.events

    # Back (empty, on its port): new chats use it again within seconds.
    shards.servers[victim].start()
    wait_until(
        lambda: client.get(gateway.url + "/readyz").json().get("down") == [],
        10,
        "the shard to be ready again",
    )

    def lands_on_victim() -> bool:
        stream = sse.read(client, gateway.url + "/chat", params={"prompt": "[long 3]"})
        assert sse.ends_done(stream), stream.events
        return shard_of(stream.events[0]["job_id"], SHARDS) == victim

    wait_until(lands_on_victim, 20, "a chat on the returned shard")


def test_readyz_is_503_only_when_no_shard_answers(tmp_path: Path, client: httpx.Client) -> None:
    nowhere = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(2)]
    stack = Stack(",".join(nowhere), tmp_path, env=FAST_ENV)
    gateway = stack.add_gateway()
    try:
        ready = client.get(gateway.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["down"] == nowhere
        assert "no Redis shard is reachable" in ready.json()["error"]
        chat = client.post(gateway.url + "/chat", json={"prompt": "hi"})
        assert chat.status_code == 503, chat.text
    finally:
        gateway.stop()


def test_a_gateway_started_with_a_shard_down_puts_every_chat_on_the_others(
    tmp_path: Path, client: httpx.Client
) -> None:
    """Every new chat meets the down shard in its turn (a fresh connection refused): it goes
    on to the next at once, rate limit included, whose window lives in the down shard."""
    live = RedisServer(tmp_path / "live")
    live.start()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    # The caller's rate-limit window (per address without keys) hashes to the dead shard.
    urls = [dead, live.url] if home("addr:127.0.0.1", 2) == 0 else [live.url, dead]
    stack = Stack(",".join(urls), tmp_path, env={"RATE_LIMIT_PER_MIN": "1000"}).start(1, 1)
    try:
        for _ in range(6):
            stream = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 2]"})
            assert sse.ends_done(stream), stream.events
            assert shard_of(stream.events[0]["job_id"], 2) == urls.index(live.url)
        assert client.head(stack.gateway.url + "/chat", params={"prompt": "hi"}).status_code == 200
        assert client.get(stack.gateway.url + "/readyz").json()["down"] == [dead]
    finally:
        stack.stop()
        live.stop()


@contextmanager
def hung_listener() -> Iterator[str]:
    """A Redis URL whose port accepts no connection and refuses none: its backlog is full,
    so a connect hangs until its timeout (a host gone mid-network, not a closed port)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # what the kernel queues despite backlog 0
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for sock in (*fillers, listener):
            sock.close()


def test_a_caller_whose_rate_window_lives_in_a_hung_shard_waits_for_it_once(
    tmp_path: Path, client: httpx.Client
) -> None:
    """A shard whose connects hang costs the first chat its connect timeout (2 s); the chats
    after it, while the shard is known down, do not wait for it: the caller's window is
    skipped at once."""
    live = RedisServer(tmp_path / "live")
    live.start()
    with hung_listener() as hung:
        urls = [hung, live.url] if home("addr:127.0.0.1", 2) == 0 else [live.url, hung]
        stack = Stack(",".join(urls), tmp_path, env={"RATE_LIMIT_PER_MIN": "1000"}).start(1, 1)
        try:
            took = []
            for _ in range(3):
                began = time.monotonic()
                created = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
                took.append(time.monotonic() - began)
                assert created.status_code == 202, created.text
                assert shard_of(created.json()["job_id"], 2) == urls.index(live.url)
            assert took[0] > 1.5, took  # it met the hung shard: the connect timeout
            assert max(took[1:]) < 1.0, took  # known down since: not waited for again
        finally:
            stack.stop()
            live.stop()


def test_a_hung_shard_costs_one_chat_a_wait_and_the_others_go_elsewhere(
    tmp_path: Path, client: httpx.Client
) -> None:
    """A Redis that stops answering (SIGSTOP: its connections stay open, commands go
    unanswered) is no refused connection: the chat that meets it waits out the round trip
    (5 s), then goes to the next shard; the chats after it go elsewhere at once."""
    live, hung = RedisServer(tmp_path / "live"), RedisServer(tmp_path / "hung")
    live.start()
    hung.start()
    urls = [live.url, hung.url]
    stack = Stack(",".join(urls), tmp_path, env={"RATE_LIMIT_PER_MIN": "1000"}).start(1, 1)
    try:
        for _ in range(2):  # both shards in use, their connections open
            assert (
                client.post(stack.gateway.url + "/chat", json={"prompt": "hi"}).status_code == 202
            )
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        took = []
        for _ in range(4):
            began = time.monotonic()
            created = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"}, timeout=20)
            took.append(time.monotonic() - began)
            assert created.status_code == 202, created.text
            assert shard_of(created.json()["job_id"], 2) == 0
        assert max(took) < 12 and sorted(took)[-2] < 1.5, took  # one wait at most
        # Once the mark lapses a ping looks again, not a chat: none waits for the shard.
        time.sleep(2.2)

        def timed_chat() -> float:
            began = time.monotonic()
            with httpx.Client(timeout=20) as own:
                created = own.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
            assert created.status_code == 202 and shard_of(created.json()["job_id"], 2) == 0
            return time.monotonic() - began

        with ThreadPoolExecutor(4) as pool:
            waits = sorted(pool.map(lambda _: timed_chat(), range(8)))
        assert waits[-1] < 1.5, waits
        # Awake again, it answers the next ping and takes chats again.
        hung.proc.send_signal(signal.SIGCONT)

        def back_in_use() -> bool:
            created = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
            return shard_of(created.json()["job_id"], 2) == 1

        wait_until(back_in_use, 10, "a chat in the shard that woke")
    finally:
        if hung.proc is not None:
            hung.proc.send_signal(signal.SIGCONT)
        stack.stop()
        live.stop()
        hung.stop()


def test_what_lives_in_a_down_shard_answers_503_and_the_rest_works_on(
    tmp_path: Path, client: httpx.Client
) -> None:
    """A shard that is down fails only what lives in it: a session homed there, a job's
    events, its cancel, each answer 503 saying so (api.md, difference 16); a chat without
    a session goes to the other shard."""
    live = RedisServer(tmp_path / "live")
    live.start()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stack = Stack(f"{dead},{live.url}", tmp_path).start(1, 1)
    gateway = stack.gateway.url
    try:
        session = next(f"s{i}" for i in range(1000) if home(f"s{i}", 2) == 0)
        job_id = new_job_id(0)
        answers = [
            client.post(gateway + "/chat", json={"prompt": "hi", "session": session}),
            client.get(f"{gateway}/chat/{job_id}/events"),
            client.delete(f"{gateway}/chat/{job_id}"),
        ]
        for answer in answers:
            assert answer.status_code == 503, (answer.request.url, answer.text)
            assert "Redis is unreachable" in answer.json()["error"], answer.text
            assert answer.headers["retry-after"] == "5"
        other = next(f"s{i}" for i in range(1000) if home(f"s{i}", 2) == 1)
        for params in ({"prompt": "[long 2]"}, {"prompt": "[long 2]", "session": other}):
            stream = sse.read(client, gateway + "/chat", params=params)
            assert sse.ends_done(stream), stream.events
            assert shard_of(stream.events[0]["job_id"], 2) == 1
    finally:
        stack.stop()
        live.stop()


def test_a_full_shard_hands_new_chats_to_the_next_and_readyz_stays_ready(
    tmp_path: Path, client: httpx.Client
) -> None:
    """Each shard's queue holds MAX_QUEUED_JOBS: a chat whose turn meets a full shard goes to
    the next one, and only when every shard is full is it refused (503). Full shards still
    answer: /readyz stays 200 (api.md, difference 16)."""
    servers = [RedisServer(tmp_path / name) for name in ("a", "b")]
    for server in servers:
        server.start()
    stack = Stack(",".join(s.url for s in servers), tmp_path, env={"MAX_QUEUED_JOBS": "2"})
    stack.start(1, 0)  # no worker: every chat waits in its shard's queue
    try:
        # Shard 0 is full: two waiting jobs (scored ahead, so that no janitor ends them).
        with redis.Redis.from_url(servers[0].url) as first:
            seconds, _ = first.time()
            first.zadd(keys.PENDING, {"waiting-1": seconds * 1000 + 600_000})
            first.zadd(keys.PENDING, {"waiting-2": seconds * 1000 + 600_000})
        for _ in range(2):  # one of them has its turn on shard 0
            created = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
            assert created.status_code == 202, created.text
            assert shard_of(created.json()["job_id"], 2) == 1
        refused = client.post(stack.gateway.url + "/chat", json={"prompt": "hi"})
        assert refused.status_code == 503, refused.text
        assert "the queue is full" in refused.json()["error"], refused.text
        assert refused.headers["retry-after"]
        assert client.get(stack.gateway.url + "/readyz").status_code == 200
    finally:
        stack.stop()
        for server in servers:
            server.stop()


def test_a_shard_listed_out_of_place_stops_the_start(tmp_path: Path) -> None:
    """A list reordered would make job ids and sessions name the wrong Redis: the first
    process to reach a shard records its place, and a later one that lists it elsewhere
    does not start."""
    first, second = RedisServer(tmp_path / "a"), RedisServer(tmp_path / "b")
    first.start()
    second.start()
    try:
        stack = Stack(f"{first.url},{second.url}", tmp_path)
        stack.add_gateway().stop()
        swapped = Service(
            "gateway", {**stack.env, "REDIS_URL": f"{second.url},{first.url}"}, tmp_path
        )
        swapped.start(wait=False)
        assert swapped.proc is not None and swapped.proc.wait(30) == 1
        said = swapped.log()
        assert f"{second.url} is listed as shard 0 but holds the jobs of shard 1" in said
        assert "DEL sg:shard" in said
    finally:
        first.stop()
        second.stop()


def bare_shard() -> GatewayShard:
    """A gateway's shard with no clients: what its down mark does, apart from Redis."""
    return GatewayShard(0, "redis://x", None, None, None, None, None)  # type: ignore[arg-type]


class PingedRedis:
    """What a shard's ping meets: an answer once ``answer`` is set, or a refusal."""

    def __init__(self, refuses: bool = False) -> None:
        self.answer = asyncio.Event()
        self.refuses = refuses
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        if self.refuses:
            raise redis.exceptions.ConnectionError("connection refused")
        await self.answer.wait()
        return True


def test_a_down_mark_skips_calls_that_can_do_without_the_shard_and_a_ping_looks_again() -> None:
    async def scenario() -> None:
        shard = bare_shard()
        sent: list[str] = []

        async def answered(name: str, until: asyncio.Event | None = None) -> str:
            sent.append(name)
            if until is not None:
                await until.wait()
            return name

        async def refused() -> str:
            raise NotSent("connection refused")

        async def looked() -> None:
            await asyncio.gather(*shard._looking)

        with pytest.raises(NotSent):
            await shard.attempt(refused)
        assert shard.known_down
        with pytest.raises(NotSent, match="found down"):
            await shard.attempt(lambda: answered("skipped"), skippable=True)
        assert sent == []

        # The mark lapsed: a ping looks again, and no call waits on it meanwhile.
        redis = PingedRedis()
        shard.arq = redis  # type: ignore[assignment]
        shard.down_until = time.monotonic() - 0.1
        for _ in range(3):
            with pytest.raises(NotSent):
                await shard.attempt(lambda: answered("meanwhile"), skippable=True)
        await asyncio.sleep(0)
        assert redis.pings == 1 and sent == []
        redis.answer.set()
        await looked()
        assert shard.down_until == 0.0  # it answered: in use again
        assert await shard.attempt(lambda: answered("after"), skippable=True) == "after"

        # A ping refused marks it down again, for DOWN_FOR_S.
        shard.arq = PingedRedis(refuses=True)  # type: ignore[assignment]
        shard.mark_down()
        shard.down_until = time.monotonic() - 0.1
        with pytest.raises(NotSent):
            await shard.attempt(lambda: answered("skipped"), skippable=True)
        await looked()
        assert shard.known_down

        # An answer to a call sent before the shard was found down tells nothing.
        shard.down_until = 0.0
        slow = asyncio.Event()
        earlier = asyncio.create_task(shard.attempt(lambda: answered("earlier", slow)))
        await asyncio.sleep(0)
        with pytest.raises(NotSent):
            await shard.attempt(refused)
        slow.set()
        assert await earlier == "earlier" and shard.known_down

        # A call that cannot do without it (a placement's last resort) is sent all the
        # same, and its answer ends the mark for everyone.
        shard.mark_down()
        assert await shard.attempt(lambda: answered("last resort")) == "last resort"
        assert not shard.known_down
        assert sent == ["after", "earlier", "last resort"]

    asyncio.run(scenario())
