"""Names the store keeps for itself are refused at the door: over gRPC on a live server,
a job, task, anchor or writer named like a store temporary (``*.partial``) or metadata key
gets INVALID_ARGUMENT naming the rule, and nothing is written.

(Before, such names were accepted and then never seen: listings skip the
store's temporaries.) The rule is `gradmix.store.names.validate_name`, the
one definition every layer checks names with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.store import InvalidNameError, validate_name
from gradmix.store.names import is_bookkeeping, scratch_name
from server_support import Harness, create_job, serve, source, upload_requests


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


def test_validate_name_and_listings_split_the_name_space() -> None:
    for name in ("w.partial", "zarr.json", scratch_name("zarr.json"), ".x", "zarr.9f.partial"):
        assert is_bookkeeping(name)
        with pytest.raises(InvalidNameError, match="invalid"):
            validate_name(name, "task")
    for name in ("w.partial2", "partial", "x.part", "zarr.json2", "a.b-c_d"):
        assert validate_name(name) == name and not is_bookkeeping(name)


@pytest.mark.parametrize("name", ["w.partial", "zarr.json"])
def test_reserved_names_are_refused_over_grpc(harness: Harness, name: str) -> None:
    h = harness
    create_job(h.stub)
    h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="alpha"))
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=1))
    rows = (np.ones((2, 16), np.float32), np.zeros(2), np.arange(2))
    calls: list[Callable[[], object]] = [
        lambda: create_job(h.stub, name=name),
        lambda: h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=name)),
        lambda: h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor=name, step=2)),
        lambda: h.stub.UploadSketch(iter([
            *upload_requests("job", "a0", "alpha", [rows], writer=name)])),
        lambda: h.stub.CommitSketch(pb.CommitSketchRequest(
            source=source("job", "a0", "alpha"), writer=name, committed_rows=2)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, call
        assert "invalid" in refused.value.details() and name in refused.value.details()
    assert [j.name for j in h.stub.ListJobs(pb.ListJobsRequest()).jobs] == ["job"]
    assert [t.name for t in h.stub.ListTasks(pb.ListTasksRequest(job="job")).tasks] == ["alpha"]
    assert [a.name for a in h.stub.ListAnchors(pb.ListAnchorsRequest(job="job")).anchors] == ["a0"]
