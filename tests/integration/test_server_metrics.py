"""/metrics, health and reflection of a running server; the sanity check on estimates."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.metrics import ServerMetrics
from gradmix.server.sanity import implausible
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from server_support import (
    Harness,
    Watcher,
    commit_via_store,
    create_job,
    random_rows,
    serve,
    start,
    states,
    wait_for,
    weights,
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
    "gradmix_anchor_loss": "gauge",
    "gradmix_estimated_loss": "gauge",
    "gradmix_anchors_open": "gauge",
    "gradmix_oldest_open_anchor_age_seconds": "gauge",
    "gradmix_oldest_pending_task_age_seconds": "gauge",
    "gradmix_last_estimate_age_seconds": "gauge",
    "gradmix_implausible_estimates": "counter",
    "gradmix_estimate_held": "gauge",
    "gradmix_stale_pending_tasks": "gauge",
    "gradmix_store_writable": "gauge",
    "gradmix_store_write_failures": "counter",
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
        s, "gradmix_tasks", gradmix_job="job", state="pending") == 2, "two pending tasks")
    assert isinstance(before, dict)
    assert value(before, "gradmix_watchers", gradmix_job="job") == 1
    assert value(before, "gradmix_mixture_version", gradmix_job="job") == both.version
    assert math.isnan(value(before, "gradmix_sketch_rows_committed_total", gradmix_job="job",
                            task="good"))
    # Counters exist at 0 from the start, so panels and alerts read 0, not "no data".
    for name in ("gradmix_estimation_failures_total", "gradmix_anchors_open",
                 "gradmix_estimate_held", "gradmix_oldest_open_anchor_age_seconds",
                 "gradmix_stale_pending_tasks"):
        assert value(before, name, gradmix_job="job") == 0, name
    for reason in ("loss_change", "non_finite", "untrained"):
        assert value(before, "gradmix_implausible_estimates_total", gradmix_job="job",
                     reason=reason) == 0
    assert value(before, "gradmix_oldest_pending_task_age_seconds", gradmix_job="job") > 0
    assert value(before, "gradmix_last_estimate_age_seconds", gradmix_job="job") >= 0

    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=0))
    opened = wait_for(lambda: scrape(h)[1], lambda s: value(
        s, "gradmix_anchors_open", gradmix_job="job") == 1, "the open anchor")
    aged = wait_for(lambda: scrape(h)[1], lambda s: value(
        s, "gradmix_oldest_open_anchor_age_seconds", gradmix_job="job") > value(
        opened, "gradmix_oldest_open_anchor_age_seconds", gradmix_job="job") > 0,
        "the open anchor to age")
    assert isinstance(aged, dict)
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
    assert value(after, "gradmix_sketch_rows_committed_total", gradmix_job="job",
                 task="target") == 40
    assert value(after, "gradmix_sketch_rows_committed_total", gradmix_job="job",
                 task="good") == 30
    assert value(after, "gradmix_sketch_rows_committed_total", gradmix_job="job",
                 task="bad") == 20
    assert value(after, "gradmix_tasks", gradmix_job="job", state="active") == 2
    assert value(after, "gradmix_tasks", gradmix_job="job", state="pending") == 0
    assert value(after, "gradmix_mixture_version", gradmix_job="job") == latest.version
    weight = {w.task: w.weight for w in latest.weights}
    assert value(after, "gradmix_mixture_weight", gradmix_job="job", task="good") == weight["good"]
    assert value(after, "gradmix_mixture_last_published_timestamp_seconds", gradmix_job="job") > 0
    assert value(after, "gradmix_commit_to_publish_seconds_count", gradmix_job="job") >= 1
    assert value(after, "gradmix_estimation_duration_seconds_count", gradmix_job="job") >= 2
    assert value(after, "gradmix_subsets_estimated_total", gradmix_job="job") > 0
    assert value(after, "gradmix_rpc_requests_total", method="GetJob", code="NOT_FOUND") == 1
    assert value(after, "gradmix_rpc_requests_total", method="CommitSketch", code="OK") == 3
    assert value(after, "gradmix_rpc_duration_seconds_count", method="CommitSketch") == 3
    assert value(after, "gradmix_anchor_loss", gradmix_job="job") == latest.anchor_loss
    assert value(after, "gradmix_estimated_loss", gradmix_job="job") == latest.estimated_loss
    assert latest.anchor_loss > 0
    assert value(after, "gradmix_anchors_open", gradmix_job="job") == 0
    assert value(after, "gradmix_oldest_open_anchor_age_seconds", gradmix_job="job") == 0
    assert value(after, "gradmix_oldest_pending_task_age_seconds", gradmix_job="job") == 0
    assert value(after, "gradmix_last_estimate_age_seconds", gradmix_job="job") < value(
        aged, "gradmix_last_estimate_age_seconds", gradmix_job="job") + 60
    assert value(after, "gradmix_estimate_held", gradmix_job="job") == 0

    watcher.cancel()
    wait_for(lambda: scrape(h)[1], lambda s: value(s, "gradmix_watchers", gradmix_job="job") == 0,
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


def test_a_job_s_series_are_removed_with_it() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for job in ("gone", "kept"):
        metrics.add_job(job)
        metrics.set_mixture(job, 1, 100.0, {"a": 0.5, "b": 0.5}, anchor_loss=2.0,
                            estimated_loss=1.9)
        metrics.sketch_rows_committed.labels(job, "a").inc(4)
        metrics.set_estimate(job, finished_at=100.0, open_anchors={"a1": 90.0},
                             pending_since={"c": 80.0}, implausible="loss_change", held=True)
    assert registry.get_sample_value("gradmix_implausible_estimates_total",
                                     {"gradmix_job": "gone", "reason": "loss_change"}) == 1
    assert registry.get_sample_value("gradmix_oldest_open_anchor_age_seconds",
                                     {"gradmix_job": "gone"}) > 0
    metrics.remove_job("gone")
    jobs = {s.labels.get("gradmix_job") for f in registry.collect() for s in f.samples}
    assert jobs - {None} == {"kept"}  # None: server-wide series (store health)
    assert registry.get_sample_value("gradmix_mixture_weight",
                                     {"gradmix_job": "kept", "task": "b"}) == 0.5
    metrics.add_job("gone")  # a job of the same name again starts from zero
    assert registry.get_sample_value("gradmix_sketch_rows_committed_total",
                                     {"gradmix_job": "gone", "task": "a"}) is None
    assert registry.get_sample_value("gradmix_estimation_failures_total",
                                     {"gradmix_job": "gone"}) == 0


def test_the_sanity_check_names_what_is_implausible() -> None:
    assert implausible(2.76, 0.027, 10.0) == "loss_change"  # an untrained model's anchor
    assert implausible(0.031, 0.015, 10.0) == ""             # a small loss halving
    assert implausible(1.0, 12.0, 10.0) == "loss_change"
    assert implausible(2.76, 0.027, 0.0) == ""                # no bound
    assert implausible(2.76, math.nan, 0.0) == "non_finite"
    assert implausible(math.inf, 1.0, 10.0) == "non_finite"
    # An anchor at ≥ 90% of the untrained level log V (V = 20: 3.0) has not learnt.
    assert implausible(2.924, 2.5, 100.0, untrained_loss=math.log(20),
                       untrained_fraction=0.9) == "untrained"
    assert implausible(1.2, 1.0, 100.0, untrained_loss=math.log(20),
                       untrained_fraction=0.9) == ""
    assert implausible(2.924, 2.5, 100.0, untrained_loss=0.0, untrained_fraction=0.9) == ""
    assert implausible(2.924, 2.5, 100.0, untrained_loss=3.0, untrained_fraction=0.0) == ""


def test_an_implausible_estimate_is_held_back_flagged_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A bound of 1.001: any estimate moving the loss by more than 0.1% is implausible here.
    h = start(tmp_path / "store", max_estimated_loss_ratio=1.001)
    try:
        create_job(h.stub)
        for task in ("good", "bad"):
            h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
        watcher = Watcher(h.stub, "job")
        before = watcher.until(lambda m: len(m.pending_tasks) == 2, "the uniform mixture")
        with caplog.at_level(logging.WARNING, logger="gradmix.server.jobstate"):
            h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=0))
            commit_via_store(h, "job", "a0", None, random_rows(40, seed=1))
            commit_via_store(h, "job", "a0", "good", random_rows(30, seed=2))
            commit_via_store(h, "job", "a0", "bad", random_rows(20, seed=3))
            h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a0"))
            held = wait_for(lambda: scrape(h)[1], lambda s: value(
                s, "gradmix_estimate_held", gradmix_job="job") == 1, "the held estimate")
        assert value(held, "gradmix_implausible_estimates_total", gradmix_job="job",
                     reason="loss_change") >= 1
        # The anchor's version keeps the previous weights (no swing), with their own
        # estimated loss at the anchor, for the next anchor's calibration.
        kept = watcher.until(lambda m: m.anchor == "a0", "the anchor's version")
        assert kept.version == before.version + 1 and weights(kept) == weights(before)
        assert not kept.pending_tasks and kept.estimated_loss != kept.anchor_loss
        # ... and says it is held back, why, and what the held-back estimate predicted.
        assert (kept.held, kept.held_reason) == (True, "loss_change")
        assert abs(math.log(kept.anchor_loss / kept.held_estimated_loss)) > math.log(1.001)
        assert h.store.read_mixtures("job", before.version)[0].held
        assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")) == kept
        assert value(scrape(h)[1], "gradmix_mixture_version", gradmix_job="job") == kept.version
        (message,) = {r.getMessage() for r in caplog.records if "implausible" in r.getMessage()}
        assert "job 'job': implausible estimate at anchor 'a0' (loss_change" in message
        assert f"the weights of version {before.version} stay in force" in message
        watcher.cancel()
    finally:
        h.close()
    # The same rows under the default bound are plausible: nothing is held back.
    h = start(tmp_path / "store")
    try:
        after = wait_for(lambda: scrape(h)[1], lambda s: value(
            s, "gradmix_estimation_duration_seconds_count", gradmix_job="job") >= 1,
            "the start-up re-estimate")
        assert value(after, "gradmix_estimate_held", gradmix_job="job") == 0
        assert value(after, "gradmix_implausible_estimates_total", gradmix_job="job",
                     reason="loss_change") == 0
    finally:
        h.close()
