"""Settings: the contract's defaults, and a bad value stops a process naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import Settings

from .harness import ROOT


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    s = Settings()
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.openai_base_url == "http://127.0.0.1:8001/v1"
    assert s.cors_allow_origins == "*"
    assert s.max_prompt_chars == 32000
    assert s.ping_interval_s == 15
    assert s.worker_lost_timeout_s == 30
    assert s.upstream_idle_timeout_s == 30
    assert s.queue_timeout_s == 60
    assert s.disconnect_grace_s == 10
    assert s.stream_retention_s == 3600
    assert s.max_queued_jobs == 1000
    assert s.api_keys == ""
    assert s.rate_limit_per_min == 0


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name.upper()}` |" in readme, f"{name.upper()} is not documented"


def start_with(module: str, name: str, value: str) -> subprocess.CompletedProcess[str]:
    """``python -m module`` with one setting, to its exit."""
    return subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", name: value},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.parametrize("module", ["gateway", "worker"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "localhost:6379"),
        ("REDIS_URL", "redis://host:port/0"),
        ("REDIS_URL", "redis://localhost:6379/0?protocol=3"),
        ("REDIS_URL", "redis+sentinel://s1:26379/mymaster/0?decode_responses=true"),
        ("PING_INTERVAL_S", "soon"),
        ("MAX_PROMPT_CHARS", "-1"),
        ("OPENAI_BASE_URL", "not a url"),
        ("ROLES_FILE", "/nonexistent/roles.toml"),
        ("WORKER_LOST_TIMEOUT_S", "inf"),
        ("PING_INTERVAL_S", "1e400"),
        ("API_KEYS", " , "),
        ("API_KEYS", "   "),
        ("API_KEYS_FILE", "/dev/null"),
        ("CORS_ALLOW_ORIGINS", "not a url"),
        ("CORS_ALLOW_ORIGINS", "https://app.example.com/"),
        ("CORS_ALLOW_ORIGINS", "https://ok.example.com, example.com"),
        ("CORS_ALLOW_ORIGINS", "https://app.example.com#top"),
    ],
)
def test_a_bad_value_stops_the_process_naming_it(module: str, name: str, value: str) -> None:
    result = start_with(module, name, value)
    assert result.returncode != 0
    assert name in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["gateway", "worker"])
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "redis://:hunter2@localhost:6379/zero"),
        ("REDIS_URL", "rediss://app:hunter2@localhost:port/0"),
        ("REDIS_URL", "redis+sentinel://:hunter2@s1:26379/mymaster/0?protocol=3"),
        ("OPENAI_BASE_URL", "ftp://user:hunter2@example.com/v1"),
    ],
)
def test_a_bad_value_never_shows_a_password(module: str, name: str, value: str) -> None:
    result = start_with(module, name, value)
    assert result.returncode != 0 and name in result.stderr
    assert "hunter2" not in result.stderr + result.stdout, result.stderr


def test_an_unknown_tool_stops_the_worker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker"],
        env={"PATH": "/usr/bin:/bin", "TOOLS": "calculator,oracle"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "TOOLS" in result.stderr and "oracle" in result.stderr


@pytest.mark.parametrize(
    ("module", "port"),
    [("gateway", "abc"), ("gateway", "99999"), ("demo_llm", "abc"), ("demo_llm", "-1")],
)
def test_a_bad_port_stops_the_server_naming_it(module: str, port: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", "PORT": port},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "PORT" in result.stderr and "Traceback" not in result.stderr


def test_keys_that_are_there_are_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty keys file beside API_KEYS turns nothing off; "null" is an origin."""
    empty = tmp_path / "keys"
    empty.write_text("# none yet\n")
    monkeypatch.setenv("API_KEYS", "k1")
    monkeypatch.setenv("API_KEYS_FILE", str(empty))
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "null, https://app.example.com:8443")
    assert Settings().keys == ["k1"]
    monkeypatch.setenv("API_KEYS", "")
    with pytest.raises(ValueError, match="API_KEYS_FILE: holds no key"):
        Settings()


def test_a_fractional_retention_keeps_keys_the_whole_seconds_above_it() -> None:
    from shared.timing import Timing

    timing = Timing.of(Settings(stream_retention_s=1.5))
    assert timing.retention_s == 2  # Redis expires keys in whole seconds: at least 1.5 s
    assert isinstance(timing.run_ttl_s, int) and isinstance(timing.queued_ttl_s, int)
