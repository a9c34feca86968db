"""The deploy files, checked statically (no Docker engine here) with real validators."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .harness import ROOT, procfile


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: run the README's setup"
    return found


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_follows_the_compose_spec() -> None:
    subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        check=True,
    )


def test_dockerfile_passes_hadolint() -> None:
    subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], check=True)


def test_compose_runs_the_procfile_services_plus_redis() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "gateway", "worker", "llm", "prometheus", "jaeger"}
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["jaeger"]["profiles"] == ["tracing"]
    for name in ("gateway", "worker"):  # the tracing profile's collector, when asked for
        endpoint = services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    for name in ("redis", "gateway", "llm"):
        assert "healthcheck" in services[name], name
    assert services["gateway"]["ports"] == ["8000:8000"]
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_production_override_restricts_cors_and_turns_keys_on() -> None:
    prod: dict[str, Any] = yaml.safe_load((ROOT / "compose.prod.yml").read_text())
    gateway = prod["services"]["gateway"]["environment"]
    assert gateway["CORS_ALLOW_ORIGINS"] != "*"
    assert gateway["API_KEYS_FILE"].startswith("/run/secrets/")
    assert prod["services"]["worker"]["deploy"]["replicas"] >= 2
    assert "noeviction" in prod["services"]["redis"]["command"]


def test_redis_keeps_its_data_and_never_evicts_the_queue() -> None:
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "noeviction" in redis["command"]
    assert all(
        s.get("restart") == "unless-stopped"
        for name, s in compose()["services"].items()
        if name not in ("prometheus", "jaeger")  # optional tools, off by default
    )


def test_workers_scale() -> None:
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert all("container_name" not in s for s in compose()["services"].values())


def test_model_settings_pass_through_from_env_file() -> None:
    env = compose()["services"]["worker"]["environment"]
    assert env["OPENAI_BASE_URL"] == "${OPENAI_BASE_URL:-http://llm:8001/v1}"
    assert env["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"
    assert env["OPENAI_MODEL"].startswith("${OPENAI_MODEL:-")
    # The gateway names the default role by it too (/v1's model): one value for both.
    gateway = compose()["services"]["gateway"]["environment"]
    assert gateway["OPENAI_MODEL"] == env["OPENAI_MODEL"]


def test_images_install_only_their_own_service() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '--package "streamgate-${SERVICE//_/-}"' in dockerfile
    args = {
        name: s["build"]["args"]["SERVICE"]
        for name, s in compose()["services"].items()
        if "build" in s
    }
    assert args == {"gateway": "gateway", "worker": "worker", "llm": "demo_llm"}


def test_procfile_names_exactly_the_three_services() -> None:
    assert set(procfile()) == {"gateway", "worker", "llm"}


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in readme and "scripts/test" in ci
