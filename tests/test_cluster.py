"""A Redis Cluster of three masters (redis-server in cluster mode, started here) as the
shards: chats run end to end, every job's keys in the one slot of its shard's tag, spread
over all three masters; a cursor resumes; a session's turns follow each other."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.cluster import shard_tags, tag_slot
from shared.shards import shard_of, shard_specs

from . import sse
from .harness import Stack, free_port, redis_server_binary, wait_for_port, wait_until

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
    cluster.start()
    stack = Stack(cluster.url, tmp_path_factory.mktemp("logs")).start(1, 1)
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
    for _ in range(SHARDS):
        created = client.post(stack.gateway.url + "/chat", json={"prompt": "[long 4]"})
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        done = sse.read(client, f"{stack.gateway.url}/chat/{job_id}/events")
        assert sse.ends_done(done), done.events
        assert done.text == "t0 t1 t2 t3 "
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
