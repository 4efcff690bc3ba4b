"""The monitoring artefacts against a real gradmix-server.

One real server (build_server on loopback port 0, a real store in a temp dir, a
fresh CollectorRegistry) gets a job with two tasks, a complete anchor and
uploaded sketch rows, so that every labelled series exists and a re-estimate
has run. Then:
- every metric the alert rules, the PrometheusRule and the Grafana dashboard
  query (parsed from their PromQL with promql-parser) is one the server's live
  /metrics exports, and every label they match on is one it carries;
- the image's gRPC health probe (deploy/docker/healthcheck.py) reports it
  SERVING, and reports an unreachable address as unhealthy;
- if Debian's prometheus is installed: a real Prometheus on loopback, with the
  shipped scrape config and rules, scrapes the server and returns the
  gradmix_mixture_weight series under the gradmix job's name (label
  `gradmix_job`, no honor_labels), evaluates every alert rule without error,
  and sees the job-health series read 0 and move when an anchor is declared
  and a task registered; and a second server with /metrics over HTTPS is
  scraped by the shipped scrape job's TLS settings, given the CA.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import promql_parser
import pytest
import yaml
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.proto.v1 import selection_pb2_grpc as pb_grpc
from gradmix.server.app import build_server
from gradmix.server.config import ServerConfig
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "gradmix-rules.yaml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "gradmix-dashboard.json"
JOB, TASKS, DIM = "deploy-live", ("code", "math"), 8
# Series Prometheus makes itself rather than scraping them.
SYNTHETIC = {"up"}
# Labels the scrape adds to every series.
TARGET_LABELS = {"job", "instance", "namespace"}
# Families with no sample yet on the live server (so no labels to check): the
# calibration ratio appears once an anchor interval has been observed.
UNOBSERVED = {"gradmix_calibration_ratio"}
# Grafana's variables, replaced by values of the same type before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$job": JOB}

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `probe` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
        return text


@dataclass(frozen=True)
class Live:
    grpc_address: str
    metrics_url: str
    metrics_port: int


def upload(stub: pb_grpc.SelectionServiceStub, source: pb.SketchSource, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = pb.SketchRows(dim=DIM, grads=rng.normal(size=(24, DIM)).astype("<f4").tobytes(),
                         values=rng.normal(size=24).tolist(), example_ids=list(range(24)))
    header = pb.UploadSketchHeader(source=source, writer="rank-0")
    stub.UploadSketch(iter([pb.UploadSketchRequest(header=header),
                            pb.UploadSketchRequest(rows=rows)]), timeout=30)


def populate(stub: pb_grpc.SelectionServiceStub) -> None:
    """A job with two tasks sketched at a complete anchor: every series exists."""
    sketch = pb.SketchSpec(dim=DIM, seed=7, value_kind=pb.VALUE_KIND_LOG_ODDS,
                           projector="dense", dtype=pb.SKETCH_DTYPE_FLOAT32)
    stub.CreateJob(pb.CreateJobRequest(name=JOB, spec=pb.JobSpec(sketch=sketch)), timeout=10)
    for task in TASKS:
        stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name=task), timeout=10)
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor="a0", step=0), timeout=10)
    upload(stub, pb.SketchSource(job=JOB, anchor="a0", target=True), seed=0)
    for i, task in enumerate(TASKS, start=1):
        upload(stub, pb.SketchSource(job=JOB, anchor="a0", task=task), seed=i)
    stub.CompleteAnchor(pb.CompleteAnchorRequest(job=JOB, anchor="a0"), timeout=10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    # A task pending 3 s is stale: the job-health test registers one and watches it turn.
    config = ServerConfig(store=str(tmp_path_factory.mktemp("store")), host="127.0.0.1",
                          port=0, metrics_port=0, debounce_seconds=0.05, insecure=True,
                          stale_pending_seconds=3.0)
    server, port = build_server(config, CollectorRegistry())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            populate(pb_grpc.SelectionServiceStub(channel))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        # The re-estimate after the anchor completes publishes an all-active mixture.
        active = 'gradmix_tasks{gradmix_job="deploy-live",state="active"} 2.0'
        wait_for(lambda: active in http_get(url)
                 and "gradmix_commit_to_publish_seconds_count" in http_get(url),
                 "the re-estimate of the complete anchor")
        yield Live(f"127.0.0.1:{port}", url, server.metrics_port)
    finally:
        server.stop(grace=1.0)


def exported(metrics_text: str) -> dict[str, set[str]]:
    """Series names on /metrics, each with the label names its samples carry."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in a PromQL expression."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next((m.value for m in matchers if m.name == "__name__"), "")
            found.append((name, {m.name for m in matchers} - {"__name__"}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def queried_expressions() -> dict[str, list[str]]:
    """Every PromQL expression deploy/ ships, by where it comes from."""
    rule_file = yaml.safe_load(RULES.read_text())["groups"]
    crd = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    dashboard = json.loads(DASHBOARD.read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variable_exprs = [v["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
                      for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {
        "gradmix-rules.yaml": [r["expr"] for g in rule_file for r in g["rules"]],
        "prometheusrule.yaml": [r["expr"] for g in crd for r in g["rules"]],
        "gradmix-dashboard.json": panel_exprs + variable_exprs,
    }


def test_alerts_and_dashboard_query_only_metrics_the_server_exports(live: Live) -> None:
    series = exported(http_get(live.metrics_url))
    for source, expressions in queried_expressions().items():
        assert expressions, source
        for expr in expressions:
            for name, labels in selectors(expr):
                if name in SYNTHETIC:
                    continue
                assert name in series, f"{source}: {name} is not exported (in {expr!r})"
                if not series[name] and name in UNOBSERVED:
                    continue
                missing = labels - series[name] - TARGET_LABELS
                assert not missing, f"{source}: {name} has no label(s) {missing} (in {expr!r})"


def family_name(series: str) -> str:
    """The metric family a series name belongs to (histogram and counter suffixes off)."""
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_every_server_metric_is_on_the_dashboard_or_an_alert(live: Live) -> None:
    watched = {family_name(name) for exprs in queried_expressions().values()
               for expr in exprs for name, _ in selectors(expr)}
    # `*_created` are prometheus_client's per-series creation times, not metrics of their own.
    families = {f.name for f in text_string_to_metric_families(http_get(live.metrics_url))
                if f.name.startswith("gradmix_") and not f.name.endswith("_created")}
    assert len(families) >= 12
    assert sorted(families - watched) == []


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_image_healthcheck_reports_serving_and_unreachable(live: Live) -> None:
    healthy = run_healthcheck("--address", live.grpc_address)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.strip() == f"{live.grpc_address}: SERVING"
    closed = f"127.0.0.1:{free_port()}"
    down = run_healthcheck("--address", closed, "--timeout", "1")
    assert down.returncode == 1
    assert down.stdout.startswith(f"{closed}: ")


def prometheus_config(tmp_path: Path, metrics_port: int, ca: Path | None = None) -> Path:
    """The shipped scrape config, pointed at a server, scraping every second.

    It scrapes HTTPS (for `[tls] metrics = true`): with `ca`, that CA file
    replaces the shipped path; without, the TLS settings are dropped for the
    plaintext live server, as its comment says to.
    """
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    if ca is None:
        del job["scheme"], job["tls_config"]
    else:
        job["tls_config"]["ca_file"] = str(ca)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def query(api: str, promql: str) -> list[dict[str, Any]]:
    reply = json.loads(http_get(f"{api}/query?query={urllib.parse.quote(promql)}"))
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def rules_evaluated(api: str) -> list[dict[str, Any]] | None:
    """The loaded alert rules once each has been evaluated at least once."""
    groups = json.loads(http_get(f"{api}/rules"))["data"]["groups"]
    rules: list[dict[str, Any]] = [r for g in groups for r in g["rules"]]
    return rules if rules and all(r["health"] != "unknown" for r in rules) else None


@pytest.fixture
def prometheus(live: Live, tmp_path: Path) -> Iterator[str]:
    yield from run_prometheus(prometheus_config(tmp_path, live.metrics_port), tmp_path)


def run_prometheus(config: Path, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on loopback with `config`; yields its API's URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (scripts/install_system_deps.sh installs it)")
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [binary, f"--config.file={config}",
         f"--web.listen-address={address}", f"--storage.tsdb.path={tmp_path / 'data'}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        yield f"http://{address}/api/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_prometheus_scrapes_the_mixture_weights(live: Live, prometheus: str) -> None:
    def weights() -> list[dict[str, Any]] | None:
        try:
            return query(prometheus, "gradmix_mixture_weight")
        except OSError:
            return None  # not listening yet

    series = wait_for(weights, "Prometheus to scrape gradmix_mixture_weight")
    # No honor_labels: the gradmix job is `gradmix_job`, `job` the scrape job.
    assert sorted(s["metric"]["task"] for s in series) == sorted(TASKS)
    assert {s["metric"]["gradmix_job"] for s in series} == {JOB}
    assert {s["metric"]["job"] for s in series} == {"gradmix-server"}
    assert sum(float(s["value"][1]) for s in series) == pytest.approx(1.0)
    (up,) = query(prometheus, 'up{job="gradmix-server"}')
    assert up["value"][1] == "1"
    rules = wait_for(lambda: rules_evaluated(prometheus), "the alert rules to be evaluated")
    assert {r["name"] for r in rules} >= {"GradmixServerDown", "GradmixMixtureStale"}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_prometheus_scrapes_https_metrics_with_the_shipped_tls_settings(tmp_path: Path) -> None:
    """A server with `tls_metrics` (as the prod overlay runs it), its certificate made
    for the name the shipped config checks: the shipped scrape job, given the CA,
    scrapes it (up = 1) and gets its series."""
    spec = importlib.util.spec_from_file_location("make_certs", ROOT / "scripts" /
                                                  "make_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_certs", module)
    spec.loader.exec_module(module)
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"]
    certs = module.make_certs(tmp_path / "pki", hosts=[job["tls_config"]["server_name"]])
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    config = ServerConfig(store=str(tmp_path / "store"), host="127.0.0.1", port=0,
                          metrics_port=0, tls_cert=str(certs.server_cert),
                          tls_key=str(certs.server_key), tls_metrics=True,
                          auth_tokens_file=str(tokens))
    server, _ = build_server(config, CollectorRegistry())
    try:
        api = run_prometheus(prometheus_config(tmp_path, server.metrics_port, certs.ca),
                             tmp_path)
        url = next(api)

        def up() -> list[dict[str, Any]] | None:
            try:
                series = query(url, 'up{job="gradmix-server"}')
            except OSError:
                return None  # not listening yet
            return series if series and series[0]["value"][1] == "1" else None

        try:
            wait_for(up, "Prometheus to scrape /metrics over HTTPS")
            assert query(url, "gradmix_store_writable")[0]["value"][1] == "1"
        finally:
            api.close()  # stops Prometheus
    finally:
        server.stop(grace=1.0)


def test_label_values_the_queries_match_are_the_ones_exported(live: Live) -> None:
    samples = [s for f in text_string_to_metric_families(http_get(live.metrics_url))
               for s in f.samples]
    states = {s.labels["state"] for s in samples if s.name == "gradmix_tasks"}
    codes = {s.labels["code"] for s in samples if s.name == "gradmix_rpc_requests_total"}
    status_names = {code.name for code in grpc.StatusCode}
    assert states == {"pending", "active"}
    assert "OK" in codes and codes <= status_names
    rule_file = yaml.safe_load(RULES.read_text())["groups"]
    (rpc_rule,) = [r for g in rule_file for r in g["rules"] if r["alert"] == "GradmixRPCErrors"]
    alerted = rpc_rule["expr"].split('code=~"', 1)[1].split('"', 1)[0].split("|")
    assert set(alerted) <= status_names - {"OK"}


def test_prometheus_sees_the_job_health_metrics_move(live: Live, prometheus: str) -> None:
    """Through a real scrape: counters read 0 (not "no data"), and declaring an anchor
    and registering a task move the open-anchor and pending-task series, and the task
    turns stale (the live server's stale_pending_seconds is 3)."""
    def job_value(promql: str) -> float | None:
        try:
            series = query(prometheus, promql)
        except OSError:
            return None  # not listening yet
        values = [float(s["value"][1]) for s in series
                  if s["metric"].get("gradmix_job") == JOB]
        return values[0] if len(values) == 1 else None

    def settles(promql: str, accept: Callable[[float], bool], what: str) -> float:
        def probe() -> tuple[float] | None:
            value = job_value(promql)
            return (value,) if value is not None and accept(value) else None
        return wait_for(probe, what)[0]

    settles('gradmix_implausible_estimates_total{reason="loss_change"}', lambda v: v == 0,
            "the implausible-estimate counter at 0")
    settles("gradmix_estimation_failures_total", lambda v: v == 0, "the failure counter at 0")
    settles('gradmix_implausible_estimates_total{reason="untrained"}', lambda v: v == 0,
            "the untrained-anchor counter at 0")
    settles("gradmix_stale_pending_tasks", lambda v: v == 0, "no stale pending task")
    with grpc.insecure_channel(live.grpc_address) as channel:
        stub = pb_grpc.SelectionServiceStub(channel)
        mixture = stub.GetMixture(pb.GetMixtureRequest(job=JOB), timeout=10)
        settles("gradmix_anchor_loss", lambda v: v == mixture.anchor_loss, "the anchor loss")
        settles("gradmix_estimated_loss", lambda v: v == mixture.estimated_loss,
                "the estimated loss")
        settles("gradmix_anchors_open", lambda v: v == 0, "no open anchor")
        stub.DeclareAnchor(pb.DeclareAnchorRequest(job=JOB, anchor="a1", step=10), timeout=10)
        stub.RegisterTask(pb.RegisterTaskRequest(job=JOB, name="late"), timeout=10)
    settles("gradmix_anchors_open", lambda v: v == 1, "the open anchor")
    settles("gradmix_oldest_open_anchor_age_seconds", lambda v: v > 0, "the anchor's age")
    settles('gradmix_tasks{state="pending"}', lambda v: v == 1, "the pending task")
    settles("gradmix_oldest_pending_task_age_seconds", lambda v: v > 0, "the task's wait")
    settles("gradmix_last_estimate_age_seconds", lambda v: v < 30, "a recent estimate")
    settles("gradmix_stale_pending_tasks", lambda v: v == 1, "the task pending 3 s stale")
    rules = wait_for(lambda: rules_evaluated(prometheus), "the alert rules to be evaluated")
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
