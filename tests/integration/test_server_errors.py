"""Every refused request gets its status code and a message naming the problem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.rows import encode_rows
from server_support import (
    DIM,
    Harness,
    commit_via_store,
    create_job,
    random_rows,
    serve,
    source,
    upload_requests,
)

Code = grpc.StatusCode


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


def refused(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == code, error.details()
    details = error.details()
    for word in words:
        assert word in details, details
    return details


@pytest.fixture
def job(harness: Harness) -> Harness:
    """A job with tasks t1, t2, anchor a0 (open) and a1 (complete, target sketched)."""
    create_job(harness.stub)
    for task in ("t1", "t2"):
        harness.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    harness.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=1))
    harness.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=2))
    commit_via_store(harness, "job", "a1", None, random_rows(32, seed=1))
    commit_via_store(harness, "job", "a1", "t1", random_rows(32, seed=2))
    harness.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a1"))
    return harness


def test_job_errors(harness: Harness) -> None:
    stub = harness.stub
    refused(lambda: create_job(stub, name="../etc"), Code.INVALID_ARGUMENT, "name")
    refused(lambda: create_job(stub, dim=0), Code.INVALID_ARGUMENT, "dim")
    refused(lambda: create_job(stub, subset_fraction=1.5), Code.INVALID_ARGUMENT)
    create_job(stub, temperature=0.5)
    refused(lambda: create_job(stub, dim=DIM + 1), Code.ALREADY_EXISTS, "dim", "16", "17")
    refused(lambda: create_job(stub, temperature=0.25), Code.ALREADY_EXISTS, "temperature")
    refused(lambda: stub.GetJob(pb.GetJobRequest(name="missing")), Code.NOT_FOUND, "missing")


def test_task_and_anchor_errors(job: Harness) -> None:
    stub = job.stub
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(job="nope", name="t")),
            Code.NOT_FOUND, "nope")
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="a..b")),
            Code.INVALID_ARGUMENT)
    stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="t3", metadata={"uri": "x"}))
    refused(lambda: stub.RegisterTask(pb.RegisterTaskRequest(
        job="job", name="t3", metadata={"uri": "y"})), Code.ALREADY_EXISTS, "uri")
    refused(lambda: stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=5)),
            Code.ALREADY_EXISTS, "step")
    refused(lambda: stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="zz")),
            Code.NOT_FOUND, "zz")


def test_commit_errors(job: Harness) -> None:
    stub = job.stub
    job.store.writer("job", "a1", "t2", "w9").append(*random_rows(5, seed=3))
    refused(lambda: stub.CommitSketch(pb.CommitSketchRequest(
        source=source("job", "a1", "t2"), writer="w9", committed_rows=6)),
        Code.FAILED_PRECONDITION, "holds 5", "w9")
    refused(lambda: stub.CommitSketch(pb.CommitSketchRequest(
        source=source("job", "a1", "ghost"), writer="w9", committed_rows=1)),
        Code.NOT_FOUND, "ghost")
    refused(lambda: stub.CommitSketch(pb.CommitSketchRequest(
        source=pb.SketchSource(job="job", anchor="a1"), writer="w9", committed_rows=1)),
        Code.INVALID_ARGUMENT, "task")
    refused(lambda: stub.CommitSketch(pb.CommitSketchRequest(
        source=source("job", "a1", "t2"), writer="bad/writer", committed_rows=1)),
        Code.INVALID_ARGUMENT)
    ok = stub.CommitSketch(pb.CommitSketchRequest(
        source=source("job", "a1", "t2"), writer="w9", committed_rows=5))
    assert ok.total_rows == 5


def test_upload_errors_keep_rows_already_stored(job: Harness) -> None:
    stub = job.stub
    good = random_rows(8, seed=4)

    def upload(*messages: pb.UploadSketchRequest) -> pb.UploadSketchResponse:
        return stub.UploadSketch(iter(messages))

    rows_only = pb.UploadSketchRequest(rows=encode_rows(*good))
    refused(lambda: upload(rows_only), Code.INVALID_ARGUMENT, "header")
    refused(lambda: upload(), Code.INVALID_ARGUMENT, "header")
    wide = random_rows(3, dim=2 * DIM, first_id=100)
    refused(lambda: stub.UploadSketch(upload_requests("job", "a1", "t2", [wide])),
            Code.INVALID_ARGUMENT, "dim 32", "16")
    nan = random_rows(3, first_id=100)
    nan[0][1, 2] = np.nan
    refused(lambda: stub.UploadSketch(upload_requests("job", "a1", "t2", [good, nan])),
            Code.INVALID_ARGUMENT, "NaN")
    # The chunk before the bad one is stored and counted.
    assert job.store.committed_rows("job", "a1", "t2") == 8
    short = encode_rows(*random_rows(2, first_id=200))
    short.grads = short.grads[:-4]
    header = next(upload_requests("job", "a1", "t2", []))
    refused(lambda: upload(header, pb.UploadSketchRequest(rows=short)),
            Code.INVALID_ARGUMENT, "bytes")
    refused(lambda: upload(header, rows_only, header), Code.INVALID_ARGUMENT, "header")
    refused(lambda: stub.UploadSketch(upload_requests("job", "nowhere", "t2", [good])),
            Code.NOT_FOUND, "nowhere")


def test_mixture_errors(harness: Harness) -> None:
    stub = harness.stub
    refused(lambda: stub.GetMixture(pb.GetMixtureRequest(job="none")), Code.NOT_FOUND, "none")
    create_job(stub)
    refused(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job")), Code.NOT_FOUND,
            "register a task")
    stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="t1"))
    refused(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job", version=99)),
            Code.NOT_FOUND, "99")
    refused(lambda: next(iter(stub.WatchMixture(pb.WatchMixtureRequest(job="none")))),
            Code.NOT_FOUND)


def test_estimate_errors(job: Harness) -> None:
    stub = job.stub

    def estimate(anchor: str = "", *subsets: pb.Subset) -> pb.EstimateSubsetsResponse:
        return stub.EstimateSubsets(pb.EstimateSubsetsRequest(
            job="job", anchor=anchor, subsets=list(subsets)))

    refused(lambda: estimate("a0", pb.Subset(tasks=["t1"])), Code.FAILED_PRECONDITION,
            "not complete")
    refused(lambda: estimate("a9"), Code.NOT_FOUND, "a9")
    refused(lambda: estimate("", pb.Subset(tasks=["ghost"])), Code.NOT_FOUND, "ghost")
    refused(lambda: estimate("", pb.Subset(tasks=["t2"])), Code.FAILED_PRECONDITION,
            "t2", "pending")
    refused(lambda: estimate("", pb.Subset(tasks=["t1"], weights=[0.5, 0.5])),
            Code.INVALID_ARGUMENT, "weights")
    assert len(estimate("", pb.Subset(tasks=["t1"])).losses) == 1
    refused(lambda: stub.SelectTasks(pb.SelectTasksRequest(
        job="job", method=pb.SELECTION_METHOD_TOP_K, k=0)), Code.INVALID_ARGUMENT, "k")


def test_estimate_needs_a_complete_anchor_with_target_rows(harness: Harness) -> None:
    stub = harness.stub
    create_job(stub)
    stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="t1"))
    refused(lambda: stub.EstimateSubsets(pb.EstimateSubsetsRequest(job="job")),
            Code.FAILED_PRECONDITION, "no complete anchor")
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=1))
    commit_via_store(harness, "job", "a0", "t1", random_rows(16))
    stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a0"))
    refused(lambda: stub.SelectTasks(pb.SelectTasksRequest(job="job")),
            Code.FAILED_PRECONDITION, "target")
