"""deploy/kubernetes, checked offline (no cluster here): every manifest against the
Kubernetes schemas kubernetes-validate ships, KEDA's ScaledObject against a schema of the
fields it uses (KEDA's CRD is not among them), and every setting, port, path and name
against the code and the other manifests it must agree with."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from starlette.routing import Route

from shared.settings import ServerAddress, Settings

from .harness import ROOT

K8S = ROOT / "deploy" / "kubernetes"
# preStop's `sleep` action is on by default from 1.30 (beta; GA in 1.34): the oldest
# Kubernetes the manifests are for, and the newest the package ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# The termination grace beyond the waits, as compose's stop_grace_period gives (25 s for
# a SHUTDOWN_GRACE_S of 20): time to hand back jobs, close connections and exit.
MARGIN_S = 5
GATEWAY, WORKER, LLM = "streamgate-gateway", "streamgate-worker", "streamgate-llm"
# The image each Deployment runs, and the Dockerfile's SERVICE it is built with.
IMAGES = {
    "streamgate-gateway": "gateway",
    "streamgate-worker": "worker",
    "streamgate-demo-llm": "demo_llm",
}
SECRET = "streamgate-secrets"
# Variables the gateway and the worker read besides Settings' fields.
ADDRESS_VARS = {"HOST", "PORT"}


# --- reading the manifests -------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, object) for every object of every manifest file."""
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path.name, doc))
    return tuple(found)


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def container(deployment: str) -> dict[str, Any]:
    containers = objects("Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment}: one container expected"
    found: dict[str, Any] = containers[0]
    return found


def environment(deployment: str) -> dict[str, str | None]:
    """The container's variables as it sees them: its ConfigMaps', then its own `env`
    (which wins). A variable from a Secret has the value None."""
    c = container(deployment)
    config_maps = objects("ConfigMap")
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, f"{deployment}: envFrom only from ConfigMaps here"
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"{deployment}: no ConfigMap {name} in {K8S}"
        env.update(config_maps[name]["data"])
    for var in c.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def named_port(deployment: str, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment).get("ports", [])}
    assert name in ports, f"{deployment}: no container port named {name!r}"
    return int(ports[name])


def template_labels(deployment: str) -> dict[str, str]:
    labels: dict[str, str] = objects("Deployment")[deployment]["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def selected(selector: dict[str, str]) -> set[str]:
    """The Deployments whose pods a label selector picks."""
    return {
        name for name in objects("Deployment") if selector.items() <= template_labels(name).items()
    }


def shutdown_grace_s(deployment: str) -> float:
    env = environment(deployment)
    raw = env.get("SHUTDOWN_GRACE_S")
    default = Settings.model_fields["shutdown_grace_s"].default
    return float(raw) if raw is not None else float(default)


def scaled_object() -> dict[str, Any]:
    found = objects("ScaledObject")
    assert list(found) == [WORKER], "one ScaledObject, for the workers"
    return found[WORKER]


def prometheus_queries() -> list[str]:
    triggers = scaled_object()["spec"]["triggers"]
    return [t["metadata"]["query"] for t in triggers if t["type"] == "prometheus"]


@cache
def gateway_routes() -> dict[str, set[str]]:
    from gateway.app import create_app

    return _routes(create_app(Settings()).routes)


@cache
def demo_llm_routes() -> dict[str, set[str]]:
    from demo_llm.app import create_app

    return _routes(create_app(0.0).routes)


def _routes(routes: list[Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, Route):
            found.setdefault(route.path, set()).update(route.methods or ())
    return found


def metric_names(service: str) -> set[str]:
    module = ROOT / "services" / service / "src" / service / "metrics.py"
    return set(re.findall(r'"(streamgate_\w+)"', module.read_text()))


def readme() -> str:
    return (K8S / "README.md").read_text()


# --- the schemas -------------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= {"apiVersion", "kind", "namespace", "resources", "images", "labels"}
    assert sorted(k["resources"]) == [p.name for p in manifest_files()]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_follows_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    errors = []
    for name, doc in documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # not Kubernetes' own: test_the_scaled_object_follows_kedas_schema
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            what = f"{doc['kind']} {doc['metadata']['name']}"
            errors.append(f"{name}: {what}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
        checked += 1
    assert not errors, "\n".join(errors)
    assert checked >= 7


def test_the_scaled_object_follows_kedas_schema() -> None:
    schema = json.loads((ROOT / "tests" / "fixtures" / "keda-scaledobject.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    so = scaled_object()
    jsonschema.Draft202012Validator(schema).validate(so)
    # Its HPA behavior is Kubernetes' own type: check it as part of an HPA.
    spec = so["spec"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": WORKER},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": WORKER},
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)


def test_the_keda_schema_refuses_what_the_api_server_would() -> None:
    """The schema is strict enough to catch a typo, a number where KEDA wants a string
    and a Prometheus trigger without its query."""
    schema = json.loads((ROOT / "tests" / "fixtures" / "keda-scaledobject.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)

    def broken(change: Any) -> dict[str, Any]:
        so: dict[str, Any] = json.loads(json.dumps(scaled_object()))
        change(so["spec"])
        return so

    cases = [
        lambda s: s.update(maxReplicas=3),
        lambda s: s["triggers"][0]["metadata"].update(threshold=150),
        lambda s: s["triggers"][0]["metadata"].pop("query"),
        lambda s: s["triggers"][0]["metadata"].update(treshold="1"),
        lambda s: s["scaleTargetRef"].pop("name"),
    ]
    for change in cases:
        assert not validator.is_valid(broken(change))


# --- agreement with the code -------------------------------------------------------------


def test_every_variable_is_a_setting_the_service_reads() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    for deployment in (GATEWAY, WORKER):
        for name in environment(deployment):
            assert name in settings or name in ADDRESS_VARS or name.startswith("OTEL_"), (
                f"{deployment}: {name} is no setting of shared/settings.py"
            )
    # The demo LLM reads its own few (services/demo_llm/src/demo_llm/__main__.py).
    main = (ROOT / "services/demo_llm/src/demo_llm/__main__.py").read_text()
    demo_vars = set(re.findall(r'(?:_setting\(|environ\.get\()\s*"([A-Z0-9_]+)"', main))
    assert {"HOST", "PORT"} <= demo_vars
    for name in environment(LLM):
        assert name in demo_vars, f"{LLM}: the demo LLM does not read {name}"


def test_every_value_passes_the_services_own_validation() -> None:
    for deployment in (GATEWAY, WORKER):
        env = environment(deployment)
        values = {
            name.lower(): value
            for name, value in env.items()
            # Not from a Secret (no value here), nor a file in a volume (the Secret's
            # test checks API_KEYS_FILE)
            if value is not None and not name.endswith("_FILE")
        }
        Settings.model_validate({k: v for k, v in values.items() if k in Settings.model_fields})
        ServerAddress.model_validate({"host": env["HOST"], "port": env.get("PORT") or 8000})
        assert env["HOST"] == "0.0.0.0", f"{deployment}: listen on every address of the pod"
    assert environment(LLM)["HOST"] == "0.0.0.0"


def test_container_ports_are_the_ports_the_processes_listen_on() -> None:
    for deployment in (GATEWAY, LLM):
        port = environment(deployment).get("PORT")
        assert port is not None, f"{deployment}: set PORT, the port is declared from it"
        assert named_port(deployment, "http") == int(port)
    metrics_port = environment(WORKER).get("METRICS_PORT")
    assert metrics_port is not None and int(metrics_port) > 0, "worker metrics turned off"
    assert named_port(WORKER, "metrics") == int(metrics_port)


def test_probes_ask_routes_the_apps_serve() -> None:
    worker = container(WORKER)["livenessProbe"]["httpGet"]
    assert worker["path"] == "/healthz" and worker["port"] == "metrics"  # worker/metrics.py
    assert "readinessProbe" not in container(WORKER)  # it serves no requests
    gateway = container(GATEWAY)
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for deployment, routes in ((GATEWAY, gateway_routes()), (LLM, demo_llm_routes())):
        c = container(deployment)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe not in c:
                continue
            get = c[probe]["httpGet"]
            assert "GET" in routes.get(get["path"], set()), f"{deployment}: no GET {get['path']}"
            port = get["port"]
            number = named_port(deployment, port) if isinstance(port, str) else port
            assert number == int(environment(deployment)["PORT"] or 0), deployment


def test_scrape_annotations_name_the_metrics_ports() -> None:
    for deployment, port_name in ((GATEWAY, "http"), (WORKER, "metrics")):
        notes = objects("Deployment")[deployment]["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == named_port(deployment, port_name)
        assert notes["prometheus.io/path"] == "/metrics"
    assert "GET" in gateway_routes()["/metrics"]


def test_each_service_selects_its_deployment_and_a_port_of_it() -> None:
    services = objects("Service")
    assert set(services) == {GATEWAY, LLM}
    for name, service in services.items():
        assert selected(service["spec"]["selector"]) == {name}, name
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            if isinstance(target, str):
                named_port(name, target)
            else:
                assert target in {p["containerPort"] for p in container(name)["ports"]}


def test_each_deployment_selects_its_own_pods_only() -> None:
    for name, deployment in objects("Deployment").items():
        match = deployment["spec"]["selector"]["matchLabels"]
        assert match.items() <= template_labels(name).items(), name
        assert selected(match) == {name}, f"{name}'s selector picks other pods too"


def test_the_disruption_budgets_select_their_pods_and_let_drains_proceed() -> None:
    budgets = objects("PodDisruptionBudget")
    assert GATEWAY in budgets
    for name, pdb in budgets.items():
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == {name}, name
        spec = pdb["spec"]
        replicas = objects("Deployment")[name]["spec"].get("replicas")
        if "minAvailable" in spec:  # at the usual count, one pod may still go
            assert replicas is not None and spec["minAvailable"] < replicas
        else:
            assert spec["maxUnavailable"] >= 1


def test_the_gateway_hands_its_streams_over_before_it_stops() -> None:
    deployment = objects("Deployment")[GATEWAY]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    wait = container(GATEWAY)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert wait >= 3, "long enough for endpoints to drop the pod before SIGTERM"
    need = wait + shutdown_grace_s(GATEWAY) + MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= need


def test_the_worker_is_not_killed_mid_grace() -> None:
    pod = objects("Deployment")[WORKER]["spec"]["template"]["spec"]
    need = shutdown_grace_s(WORKER) + MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= need
    # Gateways and workers must agree on it (docs/operations.md).
    assert shutdown_grace_s(WORKER) == shutdown_grace_s(GATEWAY)


def test_keda_scales_the_workers_on_metrics_the_services_export() -> None:
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == WORKER
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in objects("Deployment")[WORKER]["spec"], "KEDA owns the count"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    gateway, worker = metric_names("gateway"), metric_names("worker")
    used = set()
    namespace = kustomization()["namespace"]
    for query in prometheus_queries():
        names = set(re.findall(r"\bstreamgate_\w+", query))
        assert names <= gateway | worker, f"unknown metrics: {names - gateway - worker}"
        used |= names
        for namespaces in re.findall(r'namespace="([^"]*)"', query):
            assert namespaces == namespace, "the query must read this deployment's pods"
        # Every gateway reports the same queue depth: adding them up would count it N times.
        assert not re.search(r"sum\s*\(\s*streamgate_queue_depth", query)
    assert {"streamgate_queue_depth", "streamgate_running_jobs"} <= used
    assert "streamgate_queue_depth" in gateway and "streamgate_running_jobs" in worker


def test_the_threshold_leaves_room_in_every_worker() -> None:
    raw = environment(WORKER).get("WORKER_MAX_JOBS")
    max_jobs = int(raw) if raw else Settings.model_fields["worker_max_jobs"].default
    for trigger in scaled_object()["spec"]["triggers"]:
        assert trigger.get("metricType", "AverageValue") == "AverageValue"  # per worker
        assert 0 < float(trigger["metadata"]["threshold"]) < max_jobs


def test_the_workers_reach_the_demo_llm_through_its_service() -> None:
    url = urlsplit(environment(WORKER)["OPENAI_BASE_URL"] or "")
    service = objects("Service")[LLM]
    assert url.hostname == LLM
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    assert url.path == "/v1" and "/v1/chat/completions" in demo_llm_routes()


def test_secrets_come_from_the_secret_the_readme_creates() -> None:
    assert "Secret" not in {d["kind"] for _, d in documents()}, "never commit a Secret"
    created = re.search(r"kubectl create secret generic (\S+)((?:.*\\\n)*.*)", readme())
    assert created and created.group(1) == SECRET, "README: kubectl create secret generic"
    keys = set(re.findall(r"--from-(?:literal|file)=(\w+)=", created.group(2)))
    for deployment in objects("Deployment"):
        for var in container(deployment).get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert (ref["name"], ref["key"]) in {(SECRET, k) for k in keys}, var["name"]
    # API_KEYS_FILE is a file of the Secret's volume.
    pod = objects("Deployment")[GATEWAY]["spec"]["template"]["spec"]
    path = Path(environment(GATEWAY)["API_KEYS_FILE"] or "")
    mounts = {m["mountPath"]: m["name"] for m in container(GATEWAY)["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(path.parent)]]
    assert volume["secret"]["secretName"] == SECRET
    items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
    assert items[path.name] in keys


def test_images_are_placeholders_the_kustomization_overrides() -> None:
    images = {i["name"]: i for i in kustomization()["images"]}
    used = {container(d)["image"] for d in objects("Deployment")}
    assert used == set(IMAGES) == set(images)
    text = readme()
    for image, service in IMAGES.items():
        # The README builds each with the Dockerfile's SERVICE for it, under that name.
        built = re.search(rf"--build-arg SERVICE={service} +-t +(\S+):", text)
        assert built, f"README: no build of SERVICE={service}"
        assert built.group(1) == images[image]["newName"], image


def test_the_operations_guide_links_here() -> None:
    assert "../deploy/kubernetes/README.md" in (ROOT / "docs" / "operations.md").read_text()


def test_containers_run_unprivileged() -> None:
    for name, deployment in objects("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name  # the image's USER 65534
        ctx = container(name)["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"], name
