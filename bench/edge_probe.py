"""``python -m bench.edge_probe``: what hostile clients cost a gateway that faces them alone.

Three probes against a real stack (Redis, the demo LLM, a worker, and two gateways: one
with ``MAX_STREAMS_PER_KEY=3``, one with no stream cap), printing the gateway's resident
memory before, at its peak and after, and what each client was answered:

1. ``--header-clients`` connections each sending a header of ``--header-mb`` MB;
2. ``--readers`` clients with a 2 KB receive buffer that never read the events of a
   finished ``--tokens``-token job (against the uncapped gateway);
3. ``--burst`` concurrent ``GET /chat`` against the cap of 3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from .processes import Cluster, Process, _http_ok, _python, _wait, free_port
from .runner import progress


class Peak:
    """A process's resident memory, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        rss: int = self.process.memory_info().rss
        return rss

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> Peak:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def huge_header(port: int, megabytes: int) -> str:
    """Send a header of ``megabytes`` MB (or until the gateway stops us); the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        piece = b"a" * 65536
        with contextlib.suppress(OSError):
            for _ in range(megabytes * 16):
                sock.sendall(piece)
        with contextlib.suppress(OSError):
            answer = sock.recv(200)
            return answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
        return "reset"


def stuck_reader(port: int, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the gateway has dropped this connection (reading what is left to find out)."""
    sock.setblocking(False)
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


async def burst(url: str, n: int) -> Counter[int]:
    async def one(client: httpx.AsyncClient) -> int:
        params = {"prompt": "[long 60] [delay 0.2]"}
        async with client.stream("GET", url + "/chat", params=params) as response:
            status = response.status_code
            if status == 200:
                await asyncio.sleep(3)  # hold the stream while the others arrive
            return status

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return Counter(await asyncio.gather(*(one(client) for _ in range(n))))


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            return float("nan")
        time.sleep(0.1)
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--header-clients", type=int, default=8)
    parser.add_argument("--header-mb", type=int, default=50)
    parser.add_argument("--readers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--send-timeout", type=float, default=10.0)
    o = parser.parse_args()

    logdir = Path(tempfile.mkdtemp(prefix="streamgate-edge-"))
    cluster = Cluster(logdir, llm_delay_s=0, workers=1, worker_max_jobs=None)
    cluster.extra_env = {"MAX_STREAMS_PER_KEY": "3", "SEND_TIMEOUT_S": str(o.send_timeout)}
    progress(f"starting the stack; logs in {logdir}")
    cluster.start()
    open_port = free_port()
    uncapped = Process(
        "gateway-uncapped",
        _python("gateway"),
        {**cluster.service_env(), "PORT": str(open_port), "MAX_STREAMS_PER_KEY": "0"},
        logdir,
    ).start()
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{open_port}/readyz"), "gateway", [uncapped])
        capped_port = cluster.gateway_port
        rows: list[tuple[str, str, str, str, str]] = []

        progress(f"{o.header_clients} clients sending {o.header_mb} MB headers")
        assert cluster.gateway is not None
        with Peak(cluster.gateway.pid) as peak:
            idle = peak.now()
            answers: list[str] = []

            def send_one() -> None:
                answers.append(huge_header(capped_port, o.header_mb))

            threads = [threading.Thread(target=send_one) for _ in range(o.header_clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        shown = ", ".join(f"{n} x {a}" for a, n in Counter(answers).items())
        rows.append((f"{o.header_clients} x {o.header_mb} MB header", mb(idle), mb(peak.peak),
                     mb(peak.now()), shown))  # fmt: skip

        progress(f"making a {o.tokens:,}-token job")
        with httpx.Client(timeout=600) as client:
            created = client.post(
                f"http://127.0.0.1:{open_port}/chat",
                json={"prompt": f"[long {o.tokens}] [delay 0]"},
            ).json()
            path = created["events_url"]
            with client.stream("GET", f"http://127.0.0.1:{open_port}{path}") as response:
                for _ in response.iter_raw():
                    pass  # until its end
        progress(f"{o.readers} clients that never read it")
        with Peak(uncapped.pid) as peak:
            idle = peak.now()
            readers = [stuck_reader(open_port, path) for _ in range(o.readers)]
            time.sleep(3)
            held = peak.now()
            took = wait_until(lambda: all(closed_by_server(r) for r in readers), 3 * o.send_timeout)
            for reader in readers:
                reader.close()
            time.sleep(1)
        rows.append((f"{o.readers} non-reading readers of {o.tokens:,} tokens", mb(idle),
                     mb(peak.peak), mb(peak.now()),
                     f"held {mb(held)} after 3 s; all dropped after {took:.1f} s"))  # fmt: skip

        progress(f"{o.burst} concurrent GET /chat against MAX_STREAMS_PER_KEY=3")
        with Peak(cluster.gateway.pid) as peak:
            idle = peak.now()
            statuses = asyncio.run(burst(f"http://127.0.0.1:{capped_port}", o.burst))
        shown = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
        rows.append((f"{o.burst} concurrent chats, cap 3", mb(idle), mb(peak.peak),
                     mb(peak.now()), shown))  # fmt: skip

        print("| probe | RSS idle | RSS peak | RSS after | answers |")
        print("|---|---:|---:|---:|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    finally:
        uncapped.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
