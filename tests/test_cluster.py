"""A Redis Cluster of three masters (redis-server in cluster mode, started here) as the
shards: chats run end to end, every job's keys in the one slot of its shard's tag, spread
over all three masters; a cursor resumes; a session's turns follow each other."""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.cluster import SlotOwners, cluster_target, shard_tags, tag_slot
from shared.held_connection import HeldConnection, NotSent
from shared.redis_conn import connect
from shared.shards import shard_of, shard_specs

from . import sse
from .harness import (
    Stack,
    cancel_closes_the_upstream_within_a_second,
    free_port,
    redis_server_binary,
    wait_for_port,
    wait_until,
)

MASTERS = 3
SHARDS = 6


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [_cluster_port() for _ in range(MASTERS)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}?shards={SHARDS}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port)

    def start(self) -> None:
        for port in self.ports:
            self.procs.append(
                subprocess.Popen(
                    [
                        redis_server_binary(),
                        *("--port", str(port), "--bind", "127.0.0.1"),
                        *("--cluster-enabled", "yes"),
                        *("--cluster-config-file", f"nodes-{port}.conf"),
                        *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_for_port(port, proc=self.procs[-1])
        first = self.node(self.ports[0])
        for index, port in enumerate(self.ports):
            low, high = index * 16384 // MASTERS, (index + 1) * 16384 // MASTERS - 1
            node = self.node(port)
            node.execute_command("CLUSTER ADDSLOTSRANGE", low, high)
            node.close()
            if index:
                first.execute_command("CLUSTER MEET", "127.0.0.1", port)
        first.close()

        def ready() -> bool:
            for port in self.ports:
                node = self.node(port)
                info = node.cluster("INFO")
                node.close()
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != MASTERS:
                    return False
            return True

        wait_until(ready, 30, "the cluster to form")

    def owner(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        return self.ports[slot * MASTERS // 16384]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is a port too."""
    while (port := free_port()) > 55535:
        pass
    return port


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Stack]]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    # Heartbeats 14 s apart: a cancel must reach the worker by itself (its pub/sub).
    slow_beats = {"WORKER_LOST_TIMEOUT_S": "60", "DISCONNECT_GRACE_S": "60"}
    stack = Stack(cluster.url, tmp_path_factory.mktemp("logs"), env=slow_beats).start(1, 1)
    yield cluster, stack
    stack.stop()
    cluster.stop()


def test_shard_tags_spread_evenly_over_the_masters() -> None:
    owners = Counter(tag_slot(tag) * MASTERS // 16384 for tag in shard_tags(12))
    assert sorted(owners.values()) == [4, 4, 4]
    specs = shard_specs(f"redis+cluster://a:7000,b:7001?shards={SHARDS}")
    assert [spec.slot for spec in specs] == [tag_slot(tag) for tag in shard_tags(SHARDS)]
    assert all(spec.keys.events("x").count(f"{{{spec.keys.tag}}}") == 1 for spec in specs)


def test_chats_run_end_to_end_on_every_master(
    cluster_stack: tuple[Cluster, Stack], client: httpx.Client
) -> None:
    cluster, stack = cluster_stack
    specs = shard_specs(cluster.url)
    used_masters = set()
    # Two jobs a shard at once: their tokens share the shard's calls (append_each).
    job_ids = []
    for _ in range(2 * SHARDS):
        created = client.post(
            stack.gateway.url + "/chat", json={"prompt": "[long 30] [delay 0.01]"}
        )
        assert created.status_code == 202, created.text
        job_ids.append(created.json()["job_id"])
    for job_id in job_ids:
        done = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
        assert sse.ends_done(done), done.events
        assert done.text == "".join(f"t{i} " for i in range(30))
        spec = specs[shard_of(job_id, SHARDS)]
        assert spec.slot is not None
        port = cluster.owner(spec.slot)
        used_masters.add(port)
        node = cluster.node(port)
        try:  # the job's stream is in its shard's slot, on that slot's master
            assert node.xlen(spec.keys.events(job_id)) == len(done.events)
            assert node.hget(spec.keys.meta(job_id), "final") == b"1"
        finally:
            node.close()
    assert used_masters == set(cluster.ports)


def test_a_cursor_resumes_and_a_session_remembers(
    cluster_stack: tuple[Cluster, Stack], client: httpx.Client
) -> None:
    _, stack = cluster_stack
    url = stack.gateway.url + "/chat"
    part = sse.read(client, url, params={"prompt": "[long 30] [delay 0.01]"}, stop_after=4)
    rest = sse.read(client, url, headers={"Last-Event-ID": part.last_id})
    assert sse.ends_done(rest), rest.events
    assert part.text + rest.text == "".join(f"t{i} " for i in range(30))
    for turn in range(2):
        said = sse.read(client, url, params={"prompt": f"[echo] turn {turn}", "session": "c1"})
        assert sse.ends_done(said), said.events
    assert "turn 0" in said.text and "turn 1" in said.text
    ready = client.get(stack.gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ready",
        "shards": SHARDS,
        "down": [],
    }


def test_a_cancel_reaches_the_worker_within_a_second_and_the_running_index_names_the_job(
    cluster_stack: tuple[Cluster, Stack], client: httpx.Client
) -> None:
    cluster, stack = cluster_stack
    specs = shard_specs(cluster.url)
    for _ in range(3):  # a beat may fall in the second; three in a row cannot all
        created = client.post(stack.gateway.url + "/chat", json={"prompt": "[long 10] [wait 30]"})
        job_id = created.json()["job_id"]
        events_url = f"{stack.gateway.url}/chat/{job_id}/events"
        started = sse.read(client, events_url, stop_after=2)
        assert started.events[-1]["lifecycle"] == "started"
        spec = specs[shard_of(job_id, SHARDS)]
        assert spec.slot is not None
        node = cluster.node(cluster.owner(spec.slot))
        try:  # the running attempt is filed under the job (the janitor checks it by that)
            running = [m.decode() for m in node.zrange(spec.keys.running, 0, -1)]
            assert any(member.startswith(job_id + " ") for member in running), running
        finally:
            node.close()
        cancel_closes_the_upstream_within_a_second(client, stack, job_id)


def test_a_shard_whose_slot_moves_to_another_master_follows_it(
    cluster_stack: tuple[Cluster, Stack], client: httpx.Client
) -> None:
    """Last: it changes the cluster. The slot of the first shard's tag moves (keys and
    all); its clients, told MOVED, ask the cluster again, and its chats carry on."""
    cluster, stack = cluster_stack
    spec = shard_specs(cluster.url)[0]
    assert spec.slot is not None
    source_port = cluster.owner(spec.slot)
    target_port = next(port for port in cluster.ports if port != source_port)
    source, target = cluster.node(source_port), cluster.node(target_port)
    try:
        source_id, target_id = source.cluster("MYID"), target.cluster("MYID")
        target.execute_command("CLUSTER SETSLOT", spec.slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", spec.slot, "MIGRATING", target_id)
        while moving := source.execute_command("CLUSTER GETKEYSINSLOT", spec.slot, 100):
            source.execute_command(
                "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *moving
            )
        for port in cluster.ports:
            node = cluster.node(port)
            node.execute_command("CLUSTER SETSLOT", spec.slot, "NODE", target_id)
            node.close()
    finally:
        source.close()
        target.close()

    def chat_on_moved_shard() -> bool:
        created = client.post(stack.gateway.url + "/chat", json={"prompt": "[long 3]"})
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        done = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
        assert sse.ends_done(done), (job_id, done.status, done.raw[:300])
        return shard_of(job_id, SHARDS) == 0

    # Its first command after the move is told MOVED: that shard sits out its 2 s.
    wait_until(chat_on_moved_shard, 15, "a chat on the shard whose slot moved")


def test_a_seed_that_does_not_answer_is_passed_over(cluster_stack: tuple[Cluster, Stack]) -> None:
    """More seeds, comma-separated: the first one down, the cluster is found by the next."""
    cluster, _ = cluster_stack
    dead = f"127.0.0.1:{free_port()}"
    target = cluster_target([f"redis+cluster://{dead},127.0.0.1:{cluster.ports[1]}"])
    owners = SlotOwners(target)
    slot = tag_slot(shard_tags(SHARDS)[1])  # the first shard's slot has moved
    host, port = asyncio.run(owners.owner(slot))
    assert (host, port) == ("127.0.0.1", cluster.owner(slot))


def test_a_round_trip_cut_by_moved_after_its_first_command_is_not_taken_for_unsent(
    cluster_stack: tuple[Cluster, Stack],
) -> None:
    """``NotSent`` lets a caller send the round trip elsewhere; once a command of it ran,
    that would do it twice: MOVED in a round trip of several commands is a plain
    connection error."""
    cluster, _ = cluster_stack
    tags = shard_tags(SHARDS)
    home = tag_slot(tags[1])
    other = next(t for t in tags if cluster.owner(tag_slot(t)) != cluster.owner(home))
    key, elsewhere = f"sg:{{{tags[1]}}}:cut-round-trip", f"sg:{{{other}}}:cut-round-trip"

    async def round_trips() -> None:
        redis = connect(cluster.url, slot=home)
        held = HeldConnection(redis)
        try:
            with pytest.raises(NotSent):  # its one command moved: nothing ran
                await held.run([("SET", elsewhere, "1")])
            with pytest.raises(RedisConnectionError) as cut:
                await held.run([("SET", key, "1"), ("SET", elsewhere, "1")])
            assert not isinstance(cut.value, NotSent), cut.value
            assert "some may have run" in str(cut.value)
            assert await redis.get(key) == b"1"
        finally:
            await redis.delete(key)
            await redis.aclose()

    asyncio.run(round_trips())
