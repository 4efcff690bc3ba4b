"""Input that cannot hurt: every bound refuses with its code and names its setting.

A real server on loopback with small limits, and the real store behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.limits import Limits
from gradmix.server.rows import encode_rows
from server_support import (
    DIM,
    Harness,
    commit_via_store,
    create_job,
    random_rows,
    source,
    start,
    upload_requests,
    wait_for,
)
from test_server_errors import refused

Code = grpc.StatusCode

SMALL = {"max_tasks_per_job": 3, "max_jobs": 2, "max_rows_per_upload": 10, "max_dim": 64,
         "max_metadata_entries": 2, "max_metadata_bytes": 64, "max_target_bytes": 32,
         "max_anchor_step_ahead": 1000, "max_name_length": 40}


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Harness]:
    h = start(tmp_path / "store", **SMALL)
    yield h
    h.close()


def anchored(h: Harness) -> None:
    """Job "job": tasks t1, t2; anchor a1 (step 10) complete with target and t1 rows."""
    create_job(h.stub)
    for task in ("t1", "t2"):
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=10))
    commit_via_store(h, "job", "a1", None, random_rows(8, seed=1))
    commit_via_store(h, "job", "a1", "t1", random_rows(8, seed=2))
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a1"))


def test_counts_and_sizes_name_their_limit(small: Harness) -> None:
    stub = small.stub
    refused(lambda: create_job(stub, dim=65), Code.INVALID_ARGUMENT, "max_dim")
    refused(lambda: stub.CreateJob(pb.CreateJobRequest(name="j", spec=pb.JobSpec(
        sketch=pb.SketchSpec(dim=DIM), target="x" * 33))), Code.INVALID_ARGUMENT,
        "max_target_bytes")
    create_job(stub, name="a")
    create_job(stub, name="b")
    create_job(stub, name="a")  # idempotent: not a new job
    refused(lambda: create_job(stub, name="c"), Code.RESOURCE_EXHAUSTED, "max_jobs")
    for task in ("t1", "t2", "t3"):
        stub.RegisterTask(pb.RegisterTaskRequest(job="a", name=task))
    stub.RegisterTask(pb.RegisterTaskRequest(job="a", name="t3"))  # idempotent
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(job="a", name="t4")),
            Code.RESOURCE_EXHAUSTED, "max_tasks_per_job")
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(
        job="b", name="m", metadata={"a": "1", "b": "2", "c": "3"})),
        Code.INVALID_ARGUMENT, "max_metadata_entries")
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(
        job="b", name="m", metadata={"uri": "x" * 100})),
        Code.INVALID_ARGUMENT, "max_metadata_bytes")


def test_long_names_are_refused_without_echoing_them(small: Harness) -> None:
    stub = small.stub
    create_job(stub)
    name = "n" * 1_000_000
    calls = [
        lambda: stub.GetJob(pb.GetJobRequest(name=name)),
        lambda: create_job(stub, name=name),
        lambda: stub.ListTasks(pb.ListTasksRequest(job=name)),
        lambda: stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=name)),
        lambda: stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor=name, step=1)),
        lambda: stub.CommitSketch(pb.CommitSketchRequest(
            source=source("job", "a1", "t1"), writer=name, committed_rows=1)),
        lambda: stub.WatchMixture(pb.WatchMixtureRequest(job=name)).next(),
    ]
    for call in calls:
        details = refused(call, Code.INVALID_ARGUMENT, "max_name_length")
        assert len(details) < 300, details


def test_a_34_mib_input_is_not_echoed_back(small: Harness) -> None:
    """Inputs this size once made the error reply itself too large to send."""
    huge = "x" * (34 * 1024 * 1024)
    details = refused(lambda: small.stub.GetJob(pb.GetJobRequest(name=huge)),
                      Code.INVALID_ARGUMENT, "max_name_length")
    assert len(details) < 300
    details = refused(lambda: small.stub.CreateJob(pb.CreateJobRequest(name="j", spec=pb.JobSpec(
        sketch=pb.SketchSpec(dim=DIM), target=huge))), Code.INVALID_ARGUMENT, "max_target_bytes")
    assert len(details) < 300


def test_anchor_steps_stay_near_the_jobs_steps(small: Harness) -> None:
    stub = small.stub
    create_job(stub)
    refused(lambda: stub.DeclareAnchor(pb.DeclareAnchorRequest(
        job="job", anchor="far", step=2**64 - 1)), Code.INVALID_ARGUMENT,
        "max_anchor_step_ahead")
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=1000))
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a2", step=2000))
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=1000))  # again
    refused(lambda: stub.DeclareAnchor(pb.DeclareAnchorRequest(
        job="job", anchor="a3", step=3001)), Code.INVALID_ARGUMENT, "max_anchor_step_ahead")


@pytest.mark.parametrize(("value", "scale", "setting"), [
    (-1e308, 1.0, "max_value_abs"), (0.5, 3e38, "max_row_norm"), (0.5, 1e7, "max_row_norm")])
def test_extreme_rows_are_refused_at_upload(small: Harness, value: float, scale: float,
                                            setting: str) -> None:
    anchored(small)
    grads, values, ids = random_rows(2, seed=3, first_id=100)
    values[:] = value
    with np.errstate(over="ignore"):
        grads = (grads * np.float32(scale)).astype(np.float32)
    grads[~np.isfinite(grads)] = np.float32(3e38)
    refused(lambda: small.stub.UploadSketch(upload_requests(
        "job", "a1", None, [(grads, values, ids)])), Code.INVALID_ARGUMENT, setting)
    assert small.store.committed_rows("job", "a1", None) == 8


def test_rows_per_upload_are_bounded(small: Harness) -> None:
    anchored(small)
    chunks = [random_rows(6, seed=4, first_id=100), random_rows(6, seed=5, first_id=200)]
    refused(lambda: small.stub.UploadSketch(upload_requests("job", "a1", "t2", chunks)),
            Code.RESOURCE_EXHAUSTED, "max_rows_per_upload")
    assert small.store.committed_rows("job", "a1", "t2") == 6  # the first chunk stays


def test_extreme_rows_committed_through_the_store_do_not_break_the_job(small: Harness) -> None:
    """A writer with store access commits rows past the bounds: they are left out of the
    estimate, and the job goes on publishing mixtures from its good rows."""
    anchored(small)
    stub = small.stub
    first = wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job")),
                     lambda m: m.anchor == "a1", "a mixture at a1")
    grads, values, ids = random_rows(2, seed=6, first_id=500)
    values[:] = -1e308
    small.store.writer("job", "a1", None, "bad").append(grads, values, ids)
    stub.CommitSketch(pb.CommitSketchRequest(source=source("job", "a1", None), writer="bad",
                                             committed_rows=2))
    commit_via_store(small, "job", "a1", "t2", random_rows(8, seed=7, first_id=600))
    later = wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job")),
                     lambda m: any(w.task == "t2" and w.state == pb.TASK_STATE_ACTIVE
                                   for w in m.weights), "t2 active")
    assert later.version > first.version
    assert all(np.isfinite(w.weight) for w in later.weights)
    assert np.isfinite(later.anchor_loss)
    losses = stub.EstimateSubsets(pb.EstimateSubsetsRequest(
        job="job", subsets=[pb.Subset(tasks=["t1", "t2"])])).losses
    assert np.isfinite(losses).all()
    assert stub.GetJob(pb.GetJobRequest(name="job")).estimation_error == ""


@pytest.mark.parametrize(("field", "value"), [
    ("floor", 0.5), ("temperature", 5e-324), ("regularization", 1e-300),
    ("regularization", 1e300), ("temperature", 1e9), ("prior_weight", 1e12),
    ("subset_count", 10**6)])
def test_policy_settings_that_cannot_make_a_mixture_are_refused(
        small: Harness, field: str, value: float) -> None:
    refused(lambda: create_job(small.stub, **{field: value}), Code.INVALID_ARGUMENT, field)


def test_the_floor_scales_down_as_tasks_grow(tmp_path: Path) -> None:
    """Floor 0.2 with 6 tasks: 6 × 0.2 > 1, yet the job has a mixture (ε in force 1/12)."""
    h = start(tmp_path / "store")
    try:
        create_job(h.stub, floor=0.2, subset_count=16)
        tasks = [f"t{i}" for i in range(6)]
        for task in tasks:
            h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
        h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=1))
        commit_via_store(h, "job", "a1", None, random_rows(8, seed=1))
        for i, task in enumerate(tasks):
            commit_via_store(h, "job", "a1", task, random_rows(8, seed=10 + i))
        h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a1"))
        mixture = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                           lambda m: m.anchor == "a1" and not m.pending_tasks, "a1 mixture")
        weights = [w.weight for w in mixture.weights]
        assert sum(weights) == pytest.approx(1.0)
        assert min(weights) >= 0.5 / 6 - 1e-9
        assert h.stub.GetJob(pb.GetJobRequest(name="job")).estimation_error == ""
    finally:
        h.close()


def test_limits_refuse_settings_out_of_range() -> None:
    with pytest.raises(ValueError, match="max_name_length"):
        Limits(max_name_length=129)
    with pytest.raises(ValueError, match="max_dim"):
        Limits(max_dim=0)
    with pytest.raises(ValueError, match="default_page_size"):
        Limits(default_page_size=10, max_page_size=5)


def test_malformed_request_bytes_are_invalid_argument(small: Harness) -> None:
    """Raw bytes that are not the method's message, over a channel with identity
    serializers: INVALID_ARGUMENT for unary, server-streaming and client-streaming calls."""
    anchored(small)
    garbage = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11, b"\x00", b"\x0b"]
    channel = small.channel
    prefix = "/gradmix.v1.SelectionService/"
    for method in ("CreateJob", "GetJob", "ListJobs", "RegisterTask", "ListTasks",
                   "DeclareAnchor", "CommitSketch", "GetMixture", "ListMixtures",
                   "EstimateSubsets", "SelectTasks"):
        call = channel.unary_unary(prefix + method)
        for data in garbage:
            refused(lambda call=call, data=data: call(data, timeout=10), Code.INVALID_ARGUMENT,
                    "not a valid protobuf")
    watch = channel.unary_stream(prefix + "WatchMixture")
    refused(lambda: next(iter(watch(b"\xff\xff", timeout=10))), Code.INVALID_ARGUMENT)
    upload = channel.stream_unary(prefix + "UploadSketch")
    refused(lambda: upload(iter([b"\xff\xff"]), timeout=10), Code.INVALID_ARGUMENT)
    header = pb.UploadSketchRequest(header=pb.UploadSketchHeader(
        source=source("job", "a1", "t1"), writer="w")).SerializeToString()
    refused(lambda: upload(iter([header, b"\x12\x03\xff"]), timeout=10),
            Code.INVALID_ARGUMENT)


def test_large_rows_within_the_bounds_are_accepted(small: Harness) -> None:
    anchored(small)
    grads, values, ids = random_rows(3, seed=8, first_id=700)
    grads *= np.float32(6e4 / float(np.abs(grads).max()))  # the job stores float16
    values[:] = -0.99e4
    response = small.stub.UploadSketch(iter([
        next(upload_requests("job", "a1", "t2", [])),
        pb.UploadSketchRequest(rows=encode_rows(grads, values, ids))]))
    assert response.rows_written == 3
