"""A live server keeps per-task statistics, not task rows: exact mode reads rows back.

Rows arrive over both paths (the store plus CommitSketch, and UploadSketch),
from two writers and in several commits, so the server ingests them
incrementally; an exact EstimateSubsets must then equal the same estimate
computed in this process on every row kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.convert import policy_config
from gradmix.server.estimator import SubsetEstimator
from server_support import (
    DIM,
    Harness,
    Planted,
    commit_via_store,
    create_job,
    serve,
    upload_requests,
    wait_for,
)

PLANTED = Planted(helpful=2, harmful=2, neutral=1, rows=60)
TASKS = sorted(PLANTED.labels)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


def sketch(h: Harness) -> None:
    create_job(h.stub)
    for task in TASKS:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a0", step=10))
    commit_via_store(h, "job", "a0", None, PLANTED.rows(None))
    for task in TASKS:  # a first part from one writer, re-estimated before the rest
        commit_via_store(h, "job", "a0", task, PLANTED.rows(task, 0, 20), writer="w0")
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a0"))
    wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
             lambda m: m.version >= 1, "a first mixture")
    for task in TASKS:  # the rest over UploadSketch, from another writer, in two chunks
        chunks = [PLANTED.rows(task, 20, 40), PLANTED.rows(task, 40, 60)]
        h.stub.UploadSketch(upload_requests("job", "a0", task, chunks, writer="up"))
    wait_for(lambda: h.stub.ListTasks(pb.ListTasksRequest(job="job")),
             lambda r: all(t.sketch_rows == 60 for t in r.tasks), "every row ingested")


def in_memory(h: Harness) -> SubsetEstimator:
    """The estimator on every row as stored (float16 gradients), kept in memory, with
    the job's λ."""
    policy = policy_config(h.store.get_job("job").settings)
    estimator = SubsetEstimator(DIM, regularization=policy.regularization)
    for source in (None, *TASKS):
        rows, _ = h.store.read_rows("job", "a0", source)
        assert len(rows) == 60
        if source is None:
            estimator.add_target_rows(rows.grads, rows.values)
        else:
            estimator.add_task_rows(source, rows.grads, rows.values)
    return estimator


def test_exact_estimates_read_rows_back_and_match_the_in_memory_computation(
        harness: Harness) -> None:
    h = harness
    sketch(h)
    subsets = [TASKS[:2], TASKS[1:4], [TASKS[4]], TASKS]
    reply = h.stub.EstimateSubsets(pb.EstimateSubsetsRequest(
        job="job", mode=pb.ESTIMATE_MODE_EXACT, subsets=[pb.Subset(tasks=s) for s in subsets]))
    expected = in_memory(h).estimate_named(subsets, mode="exact")
    np.testing.assert_allclose(reply.losses, expected, rtol=1e-9)
    fast = h.stub.EstimateSubsets(pb.EstimateSubsetsRequest(
        job="job", subsets=[pb.Subset(tasks=s) for s in subsets]))
    assert not np.allclose(fast.losses, reply.losses, rtol=1e-9)  # the exact mode did run


def test_the_job_state_holds_no_task_rows_after_ingest(harness: Harness) -> None:
    h = harness
    sketch(h)
    h.stub.EstimateSubsets(pb.EstimateSubsetsRequest(  # an exact query read rows back ...
        job="job", mode=pb.ESTIMATE_MODE_EXACT, subsets=[pb.Subset(tasks=TASKS)]))
    state = h.server._core.registry._jobs["job"].state  # the server's own object, looked into
    with state.lock:
        estimator = state.estimator_at("")[1]
        stats = [estimator.statistics(t) for t in estimator.tasks]
        assert [s.rows for s in stats] == [60] * len(TASKS)
        assert [s.held_bytes for s in stats] == [0] * len(TASKS)  # ... and kept none of them
        assert estimator.statistics(None).held_bytes > 0  # the target's rows: every estimate
