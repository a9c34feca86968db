"""Redis Sentinel: a primary, a replica and three sentinels on loopback; the primary dies,
a replica is promoted, and new chats complete with no Streamgate process restarted."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from . import sse
from .harness import Stack, free_port, redis_server_binary, wait_for_port

pytestmark = pytest.mark.slow


@dataclass
class Topology:
    primary: subprocess.Popen[bytes]
    replica: subprocess.Popen[bytes]
    replica_port: int
    sentinel_ports: list[int]
    processes: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/mymaster/0"

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0])
        try:
            _, port = client.sentinel_get_master_addr_by_name("mymaster")
            return int(port)
        finally:
            client.close()


def _server(args: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [redis_server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, proc=proc)
    return proc


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    primary_port, replica_port = free_port(), free_port()
    # --dir: a replica stores the primary's snapshot there (else in the checkout).
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    primary = _server(["--port", str(primary_port), *common], primary_port)
    replica = _server(
        ["--port", str(replica_port), *common, "--replicaof", "127.0.0.1", str(primary_port)],
        replica_port,
    )
    processes = [primary, replica]
    sentinel_ports = [free_port() for _ in range(3)]
    for port in sentinel_ports:
        config = tmp_path / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {primary_port} 2\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
        )
        processes.append(_server([str(config), "--sentinel"], port))
    topology = Topology(primary, replica, replica_port, sentinel_ports, processes)
    yield topology
    for proc in processes:
        proc.kill()
        proc.wait()


def test_chats_survive_a_sentinel_failover(topology: Topology, logdir: Path) -> None:
    stack = Stack(topology.url, logdir).start()
    expected = "".join(f"t{i} " for i in range(20))
    try:
        with httpx.Client(timeout=30) as client:
            first = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 20]"})
            assert first.text == expected
            topology.primary.kill()
            deadline = time.monotonic() + 30
            while topology.master_port() != topology.replica_port:
                assert time.monotonic() < deadline, "no replica was promoted"
                time.sleep(0.2)
            while True:  # requests may answer 503 while clients find the new primary
                assert time.monotonic() < deadline, "chats did not recover after the failover"
                response = client.post(stack.gateway.url + "/chat", json={"prompt": "[long 20]"})
                if response.status_code == 202:
                    break
                assert response.status_code == 503
                time.sleep(0.2)
            events_url = stack.gateway.url + response.json()["events_url"]
            stream = sse.read(client, events_url)
            assert stream.text == expected
            assert sse.is_done(stream.events[-1])
            again = sse.read(client, stack.gateway.url + "/chat", params={"prompt": "[long 20]"})
            assert again.text == expected
    finally:
        stack.stop()
