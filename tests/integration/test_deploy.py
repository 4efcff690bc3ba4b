"""The deployment artefacts under deploy/ render, validate and agree with each other.

Kubernetes objects: every overlay (and the trainer example) is rendered with the
real `kubectl kustomize` and each object is validated offline with
`kubernetes_validate` in strict mode (unknown fields rejected) against the
oldest Kubernetes the README supports (1.32) and the newest schemas the package
ships. The Prometheus Operator objects (ServiceMonitor, PrometheusRule) have no
schema in kubernetes_validate; they are validated against the pydantic models of
`cloudcoil.models.prometheus_operator`, which are generated from the operator's
CRD OpenAPI schemas: types, enums and required fields are checked by the model,
and unknown fields by comparing the document with the model's round trip (the
models themselves ignore extra keys).

Tools: kubectl, promtool and hadolint are the real binaries; a test whose tool
is not installed skips and names it (scripts/install_system_deps.sh installs
kubectl and promtool, the dev extra installs hadolint).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from gradmix.demo.tasks import write_tasks
from gradmix.server.config import load_config
from gradmix.trainer.config import load_config as load_train_config
from kubernetes_validate.utils import SchemaNotFoundError
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "gradmix-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "gradmix-dashboard.json"
KUSTOMIZATIONS = ["overlays/dev", "overlays/prod", "trainer"]
SERVER_OVERLAYS = ["overlays/dev", "overlays/prod"]
KUBERNETES_VERSIONS = ["1.32", kubernetes_validate.utils.latest_version()]
OPERATOR_GROUP = "monitoring.coreos.com/"


def tool(name: str) -> str:
    """Path of a command-line tool (also looked up beside this Python), or skip."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/install_system_deps.sh installs it)")
    return path


def kubectl() -> str:
    """kubectl with an embedded Kustomize v5+ (the overlays use `labels`), or skip."""
    path = tool("kubectl")
    out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True,
                         text=True, timeout=60)
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "v0")
    if int(version.lstrip("v").split(".")[0] or 0) < 5:
        pytest.skip(f"kubectl at {path} embeds Kustomize {version}; the overlays need v5+")
    return path


def render(kustomization: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/k8s/<kustomization>` renders."""
    out = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def unknown_keys(given: Any, known: Any, path: str = "") -> Iterator[str]:
    """Paths of keys in `given` that the model round trip `known` dropped."""
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                yield f"{path}.{key}"
            else:
                yield from unknown_keys(value, known[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for i, (a, b) in enumerate(zip(given, known, strict=True)):
            yield from unknown_keys(a, b, f"{path}[{i}]")


def validate_operator_object(obj: dict[str, Any]) -> None:
    """Check a ServiceMonitor or PrometheusRule against the operator's CRD models."""
    from cloudcoil.models.prometheus_operator import v1

    models: dict[str, type[BaseModel]] = {"ServiceMonitor": v1.ServiceMonitor,
                                           "PrometheusRule": v1.PrometheusRule}
    model = models[obj["kind"]]
    parsed = model.model_validate(obj)
    round_trip = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert list(unknown_keys(obj, round_trip)) == [], f"fields not in the {obj['kind']} CRD"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_strictly(rendered: dict[str, list[dict[str, Any]]],
                                         kustomization: str) -> None:
    for obj in rendered[kustomization]:
        if obj["apiVersion"].startswith(OPERATOR_GROUP):
            validate_operator_object(obj)
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_operator_validation_rejects_a_misspelt_field() -> None:
    monitor = yaml.safe_load((K8S / "components/monitoring/servicemonitor.yaml").read_text())
    validate_operator_object(monitor)
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    with pytest.raises(AssertionError, match="fields not in the ServiceMonitor CRD"):
        validate_operator_object(monitor)


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def server_config(objects: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The rendered ConfigMap's server.toml, loaded by the server's own loader."""
    path = tmp_path / "server.toml"
    path.write_text(one(objects, "ConfigMap")["data"]["server.toml"])
    return load_config(["--config", str(path)], env={})


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_config_ports_and_probes_agree(rendered: dict[str, list[dict[str, Any]]],
                                              overlay: str, tmp_path: Path) -> None:
    objects = rendered[overlay]
    config = server_config(objects, tmp_path)
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port,
                     "health": config.health_port}
    assert config.host == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):  # kubelet: no TLS
        assert container[probe]["grpc"] == {"port": config.health_port}, probe
    service_ports = {p["name"]: p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]}
    assert service_ports == {"grpc": "grpc", "metrics": "metrics"}
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert one(objects, "ConfigMap")["metadata"]["name"] in {
        v["configMap"]["name"] for v in one(objects, "StatefulSet")["spec"]["template"]["spec"]
        ["volumes"] if "configMap" in v}
    assert container["args"] == ["--config", f"{mounted['config']}/server.toml"]


def test_dev_store_is_on_the_claim_and_prod_store_in_object_storage(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    dev = rendered["overlays/dev"]
    claims = one(dev, "StatefulSet")["spec"]["volumeClaimTemplates"]
    store_mount = next(m for m in server_container(dev)["volumeMounts"] if m["name"] == "store")
    assert [c["metadata"]["name"] for c in claims] == ["store"]
    assert server_config(dev, tmp_path).store == store_mount["mountPath"]

    prod = rendered["overlays/prod"]
    container = server_container(prod)
    assert server_config(prod, tmp_path).store.startswith("s3://")
    assert "volumeClaimTemplates" not in one(prod, "StatefulSet")["spec"]
    assert "store" not in {m["name"] for m in container["volumeMounts"]}
    assert {"secretRef": {"name": "gradmix-store-credentials"}} in container["envFrom"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_restricted(rendered: dict[str, list[dict[str, Any]]], kustomization: str) -> None:
    for obj in rendered[kustomization]:
        if obj["kind"] not in ("StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "requests" in container["resources"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_selectors_pick_the_server_pods(rendered: dict[str, list[dict[str, Any]]],
                                        overlay: str) -> None:
    objects = rendered[overlay]
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": one(objects, "Service")["spec"]["selector"]}, pod_labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert selects(one(objects, "NetworkPolicy")["spec"]["podSelector"], pod_labels)


def test_network_policy_admits_trainers_to_grpc_and_prometheus_to_metrics(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    policy = one(rendered["overlays/prod"], "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    trainer_labels = one(rendered["trainer"], "Job")["spec"]["template"]["metadata"]["labels"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {"grpc", "metrics"}
    # Trainers of this namespace, and of namespaces labelled to run gradmix trainers.
    assert [selects(peer["podSelector"], trainer_labels) for peer in by_port["grpc"]] == [
        True, True]
    assert [peer.get("namespaceSelector") for peer in by_port["grpc"]] == [
        None, {"matchLabels": {"gradmix.io/trainers": "allowed"}}]
    assert not any(selects(peer["podSelector"], trainer_labels) for peer in by_port["metrics"])
    (prometheus,) = by_port["metrics"]
    assert prometheus["namespaceSelector"]["matchLabels"]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_service_monitor_scrapes_the_metrics_port_without_honor_labels(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    prod = rendered["overlays/prod"]
    monitor = one(prod, "ServiceMonitor")["spec"]
    service = one(prod, "Service")
    assert selects(monitor["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics"
    # The server names the gradmix job `gradmix_job`: nothing it exports collides with a
    # target label, so targets keep theirs.
    assert not endpoint.get("honorLabels", False)
    # The rules select up{job="gradmix-server"}: the operator's job label is the Service name.
    assert service["metadata"]["name"] == "gradmix-server"


def test_scrapes_are_https_against_the_servers_own_certificate_when_metrics_tls_is_on(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    prod = rendered["overlays/prod"]
    config = server_config(prod, tmp_path)
    assert config.tls_metrics  # prod serves /metrics over HTTPS ...
    (endpoint,) = one(prod, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"  # ... and its ServiceMonitor scrapes it so
    tls = endpoint["tlsConfig"]
    assert tls.get("insecureSkipVerify", False) is False
    # The CA is ca.crt of the very Secret whose certificate the server serves.
    volumes = {v["name"]: v for v in one(prod, "StatefulSet")["spec"]["template"]["spec"]
               ["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in server_container(prod)["volumeMounts"]}
    tls_volume = next(name for name, path in mounts.items()
                      if Path(config.tls_cert).parent == Path(path))
    assert tls["ca"]["secret"] == {"name": volumes[tls_volume]["secret"]["secretName"],
                                   "key": "ca.crt"}
    # The name checked is the Service's, which the certificate is made for (deploy/README.md).
    assert tls["serverName"] == one(prod, "Service")["metadata"]["name"]
    assert "gradmix-server" in (DEPLOY / "README.md").read_text().split(
        "python scripts/make_certs.py certs")[1].split("\n")[0]
    # The plain Prometheus scrape job is HTTPS too, checking a CA file under that name.
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"]
    assert job["scheme"] == "https"
    assert job["tls_config"]["ca_file"] and job["tls_config"]["server_name"] == tls["serverName"]
    assert not job["tls_config"].get("insecure_skip_verify", False)


def test_prometheus_rule_carries_the_rule_file_groups(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = one(rendered["overlays/prod"], "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_trainer_job_launches_one_torchrun_node_per_index(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["trainer"]
    job, service = one(objects, "Job"), one(objects, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]["value"])
    assert container["command"] == ["torchrun"]
    assert args["--nnodes"] == "$(NNODES)" and args["--node_rank"] == "$(NODE_RANK)"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    # Rank 0's stable DNS name: <job>-0.<subdomain>, the subdomain being the headless Service.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert args["--master_addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert selects({"matchLabels": service["spec"]["selector"]}, job["spec"]["template"]
                   ["metadata"]["labels"])
    assert container["args"][-4:] == ["--no-python", "gradmix-train", "--config",
                                      "/etc/gradmix/job.toml"]

def test_trainer_config_loads_and_points_at_the_prod_server_in_upload_mode(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(one(rendered["trainer"], "ConfigMap")["data"]["job.toml"])
    config = load_train_config(path, env={})
    prod = rendered["overlays/prod"]
    service = one(prod, "Service")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert config.server == f"{service['metadata']['name']}:{grpc_port}"
    # Rows go over gRPC: the trainer pods hold no store credentials, only the server does.
    assert config.upload is True
    (trainer,) = one(rendered["trainer"], "Job")["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in trainer
    assert "gradmix-store-credentials" not in yaml.safe_dump(rendered["trainer"])
    assert config.tls and config.ca_cert and config.token_file
    mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    assert {Path(config.ca_cert).parent, Path(config.token_file).parent} == {
        Path(mounts["credentials"])}
    volumes = one(rendered["trainer"], "Job")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "credentials", "secret": {"secretName": "gradmix-trainer-credentials",
                                              "defaultMode": 0o440}} in volumes
    # The init container writes the demo tasks where [data] looks for them.
    pod = one(rendered["trainer"], "Job")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    data_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "data")
    assert data_mount in init["command"][-1]
    files = [Path(config.data.target), *map(Path, config.data.tasks.values())]
    assert {f.parent for f in files} == {Path(data_mount)}
    written = write_tasks(tmp_path / "data", count=2, target_count=2)
    names = {written.target.name, *(p.name for p in written.tasks.values())}
    assert {f.name for f in files} <= names


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_serves_tls_and_tokens_from_mounted_secrets(
        rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path) -> None:
    objects = rendered[overlay]
    config = server_config(objects, tmp_path)
    assert not config.insecure and config.auth_tokens_file
    container = server_container(objects)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one(objects, "StatefulSet")["spec"]["template"]["spec"]
               ["volumes"]}
    for name, secret, files in (("tls", "gradmix-server-tls", (config.tls_cert, config.tls_key)),
                                ("tokens", "gradmix-server-tokens", (config.auth_tokens_file,))):
        assert volumes[name]["secret"]["secretName"] == secret
        # A whole-directory mount (no subPath): an updated Secret reaches the pod, and the
        # server re-reads the token file without a restart.
        assert "subPath" not in mounts[name] and mounts[name]["readOnly"] is True
        assert {str(Path(f).parent) for f in files} == {mounts[name]["mountPath"]}
    # Only the server holds the store's credentials (prod: the s3:// Secret).
    assert "gradmix-store-credentials" not in yaml.safe_dump(rendered["trainer"])


def test_promtool_accepts_and_unit_tests_the_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)],
                 ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["test", "rules", str(DEPLOY / "prometheus" / "gradmix-rules.test.yaml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_rules_cover_the_alerts_users_need() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    by_name = {r["alert"]: r for r in rules}
    assert {"GradmixServerDown", "GradmixMixtureStale", "GradmixEstimationFailing",
            "GradmixCommitToPublishSlow"} <= set(by_name)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_panels_and_variables_are_consistent() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance", "job"}
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("mixture weights", "tasks by state", "estimation latency",
                   "commit-to-publish", "rpc rate", "rpc errors", "watchers"):
        assert needed in titles, needed
    for panel in (p for p in panels if p["type"] != "row"):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]


def copied_sources(dockerfile: str) -> Iterator[str]:
    """Build-context paths a Dockerfile COPYs (not those copied from another stage)."""
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            yield from (w for w in words[1:-1] if not w.startswith("--"))


def test_dockerfiles_pass_hadolint_and_run_unprivileged() -> None:
    hadolint = tool("hadolint")
    for name in ("server", "trainer"):
        dockerfile = DEPLOY / "docker" / f"{name}.Dockerfile"
        out = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        final_stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
        assert "\nUSER ${UID}:${UID}" in final_stage
        assert "\nENTRYPOINT [" in final_stage and "\nHEALTHCHECK " in final_stage
        included = {line[1:] for line in (DEPLOY / "docker" / f"{name}.Dockerfile.dockerignore")
                    .read_text().splitlines() if line.startswith("!")}
        for source in copied_sources(dockerfile.read_text()):
            assert (ROOT / source).exists(), f"{name}.Dockerfile copies missing {source}"
            assert source.rstrip("/") in included, f"{source} is outside the build context"
    server = (DEPLOY / "docker" / "server.Dockerfile").read_text()
    assert 'ENTRYPOINT ["gradmix-server"]' in server
    assert "torch" not in server.replace("no torch", "")
