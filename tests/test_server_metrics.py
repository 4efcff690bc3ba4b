"""/metrics, health and reflection of a running server."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import (
    Harness,
    Watcher,
    commit_via_store,
    create_job,
    random_rows,
    serve,
    states,
    wait_for,
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


FAMILIES = {
    "gradmix_sketch_rows_committed": "counter",
    "gradmix_tasks": "gauge",
    "gradmix_estimation_duration_seconds": "histogram",
    "gradmix_estimation_failures": "counter",
    "gradmix_subsets_estimated": "counter",
    "gradmix_mixture_version": "gauge",
    "gradmix_mixture_weight": "gauge",
    "gradmix_mixture_last_published_timestamp_seconds": "gauge",
    "gradmix_watchers": "gauge",
    "gradmix_mixture_pinned": "gauge",
    "gradmix_regularization": "gauge",
    "gradmix_calibration_factor": "gauge",
    "gradmix_calibration_ratio": "gauge",
    "gradmix_calibration_observations": "gauge",
    "gradmix_commit_to_publish_seconds": "histogram",
    "gradmix_rpc_requests": "counter",
    "gradmix_rpc_duration_seconds": "histogram",
}


def scrape(h: Harness) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("gradmix_") and not family.name.endswith("_created"):
            assert FAMILIES.get(family.name) == family.type, family.name
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: object, name: str, **labels: str) -> float:
    """A sample's value from `scrape`'s dict; NaN when the series does not exist."""
    assert isinstance(samples, dict)
    return float(samples.get((name, frozenset(labels.items())), math.nan))


def test_metrics_move_as_the_flow_runs(harness: Harness) -> None:
    h = harness
    create_job(h.stub)
    h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="good"))
    h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="bad"))
    watcher = Watcher(h.stub, "job")
    both = watcher.until(lambda m: len(m.pending_tasks) == 2, "both tasks pending")
    before = wait_for(lambda: scrape(h)[1], lambda s: value(
        s, "gradmix_tasks", job="job", state="pending") == 2, "two pending tasks")
    assert isinstance(before, dict)
    assert value(before, "gradmix_watchers", job="job") == 1
    assert value(before, "gradmix_mixture_version", job="job") == both.version
    assert math.isnan(value(before, "gradmix_sketch_rows_committed_total", job="job",
                            task="good"))

    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=0))
    commit_via_store(h, "job", "a0", None, random_rows(40, seed=1))
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a0"))
    # Tasks sketched at the complete anchor: their commits produce the next versions.
    commit_via_store(h, "job", "a0", "good", random_rows(30, seed=2))
    commit_via_store(h, "job", "a0", "bad", random_rows(20, seed=3))
    latest = watcher.until(lambda m: set(states(m).values()) == {pb.TASK_STATE_ACTIVE},
                           "an all-active mixture")
    with contextlib.suppress(grpc.RpcError):
        h.stub.GetJob(pb.GetJobRequest(name="missing"))
    text, after = scrape(h)
    assert value(after, "gradmix_sketch_rows_committed_total", job="job", task="target") == 40
    assert value(after, "gradmix_sketch_rows_committed_total", job="job", task="good") == 30
    assert value(after, "gradmix_sketch_rows_committed_total", job="job", task="bad") == 20
    assert value(after, "gradmix_tasks", job="job", state="active") == 2
    assert value(after, "gradmix_tasks", job="job", state="pending") == 0
    assert value(after, "gradmix_mixture_version", job="job") == latest.version
    weight = {w.task: w.weight for w in latest.weights}
    assert value(after, "gradmix_mixture_weight", job="job", task="good") == weight["good"]
    assert value(after, "gradmix_mixture_last_published_timestamp_seconds", job="job") > 0
    assert value(after, "gradmix_commit_to_publish_seconds_count", job="job") >= 1
    assert value(after, "gradmix_estimation_duration_seconds_count", job="job") >= 2
    assert value(after, "gradmix_subsets_estimated_total", job="job") > 0
    assert value(after, "gradmix_rpc_requests_total", method="GetJob", code="NOT_FOUND") == 1
    assert value(after, "gradmix_rpc_requests_total", method="CommitSketch", code="OK") == 3
    assert value(after, "gradmix_rpc_duration_seconds_count", method="CommitSketch") == 3

    watcher.cancel()
    wait_for(lambda: scrape(h)[1], lambda s: value(s, "gradmix_watchers", job="job") == 0,
             "the watcher gauge to drop")
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package; lint the exposition as Prometheus would
        result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


def test_health_and_reflection(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "gradmix.v1.SelectionService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    responses = reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"gradmix.v1.SelectionService", "grpc.health.v1.Health"} <= names
