"""End-to-end flows against a real server: sketches in, ranked mixtures out, restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from server_support import (
    Harness,
    Planted,
    Watcher,
    commit_via_store,
    create_job,
    serve,
    start,
    states,
    upload_requests,
    wait_for,
    weights,
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


PLANTED = Planted(helpful=3, harmful=2, neutral=1)
HELPFUL = ("helpful-0", "helpful-1")
HARMFUL = ("harmful-0", "harmful-1")
LATE = "helpful-2"


def sketch_anchor(h: Harness, job: str = "job", anchor: str = "a0") -> None:
    """Target and one helpful + one harmful task through the store and CommitSketch,
    the other two through UploadSketch (two chunks each); then complete the anchor."""
    h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job=job, anchor=anchor, step=100))
    commit_via_store(h, job, anchor, None, PLANTED.rows(None))
    commit_via_store(h, job, anchor, HELPFUL[0], PLANTED.rows(HELPFUL[0]))
    commit_via_store(h, job, anchor, HARMFUL[0], PLANTED.rows(HARMFUL[0]))
    for task in (HELPFUL[1], HARMFUL[1]):
        chunks = [PLANTED.rows(task, 0, 24), PLANTED.rows(task, 24, 48)]
        response = h.stub.UploadSketch(upload_requests(job, anchor, task, chunks))
        assert response.rows_written == 48
        assert response.total_rows == 48
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job=job, anchor=anchor))


def register(h: Harness, tasks: tuple[str, ...] = HELPFUL + HARMFUL) -> None:
    for task in tasks:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task,
                                                   metadata={"uri": f"s3://data/{task}"}))


def all_active(mixture: pb.Mixture, tasks: tuple[str, ...]) -> bool:
    s = states(mixture)
    return all(s.get(t) == pb.TASK_STATE_ACTIVE for t in tasks)


def test_watcher_sees_helpful_tasks_ranked_above_harmful_and_late_task(harness: Harness) -> None:
    h = harness
    create_job(h.stub)
    watcher = Watcher(h.stub, "job")
    register(h)
    first = watcher.next()
    assert first.version == 1
    assert set(first.pending_tasks) <= set(HELPFUL + HARMFUL)

    sketch_anchor(h)
    ranked = watcher.until(lambda m: all_active(m, HELPFUL + HARMFUL), "all four tasks active")
    w = weights(ranked)
    assert ranked.anchor == "a0"
    assert min(w[t] for t in HELPFUL) > max(w[t] for t in HARMFUL)
    assert sum(w.values()) == pytest.approx(1.0)
    assert not ranked.pending_tasks
    assert ranked.estimated_loss < ranked.anchor_loss

    h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=LATE))
    pending = watcher.until(lambda m: LATE in weights(m), "the late task")
    assert pending.version > ranked.version
    assert list(pending.pending_tasks) == [LATE]
    commit_via_store(h, "job", "a0", LATE, PLANTED.rows(LATE))
    late = watcher.until(lambda m: all_active(m, (LATE,)), "the late task active")
    assert weights(late)[LATE] > max(weights(late)[t] for t in HARMFUL)

    versions = [m.version for m in h.stub.ListMixtures(
        pb.ListMixturesRequest(job="job")).mixtures]
    assert versions == list(range(1, late.version + 1))
    assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")).version == late.version
    assert h.stub.GetMixture(pb.GetMixtureRequest(job="job", version=1)) == first
    watcher.cancel()
    assert watcher.error is None


def test_tasks_anchors_and_jobs_report_what_was_committed(harness: Harness) -> None:
    h = harness
    created = create_job(h.stub, temperature=0.5)
    assert created.spec.policy.temperature == 0.5
    assert created.spec.policy.policy == pb.POLICY_SUBSET_SEARCH  # server default filled in
    assert create_job(h.stub, temperature=0.5) == created   # idempotent
    register(h)
    sketch_anchor(h)
    wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
             lambda m: all_active(m, HELPFUL + HARMFUL), "active mixture")  # type: ignore[arg-type]
    tasks = h.stub.ListTasks(pb.ListTasksRequest(job="job")).tasks
    assert [t.name for t in tasks] == list(HELPFUL + HARMFUL)
    assert all(t.state == pb.TASK_STATE_ACTIVE and t.sketch_rows == 48 for t in tasks)
    anchors = h.stub.ListAnchors(pb.ListAnchorsRequest(job="job")).anchors
    assert [(a.name, a.step, a.state, a.target_rows) for a in anchors] == [
        ("a0", 100, pb.ANCHOR_STATE_COMPLETE, 48)]
    job = h.stub.GetJob(pb.GetJobRequest(name="job"))
    assert (job.current_anchor, job.task_count) == ("a0", 4)
    assert job.mixture_version >= 2
    assert [j.name for j in h.stub.ListJobs(pb.ListJobsRequest()).jobs] == ["job"]


def test_estimate_and_select_against_a_live_job(harness: Harness) -> None:
    h = harness
    create_job(h.stub)
    register(h)
    sketch_anchor(h)
    estimate = h.stub.EstimateSubsets(pb.EstimateSubsetsRequest(job="job", subsets=[
        pb.Subset(tasks=list(HELPFUL)), pb.Subset(tasks=list(HARMFUL)), pb.Subset()]))
    assert estimate.anchor == "a0"
    helpful_loss, harmful_loss, empty_loss = estimate.losses
    assert helpful_loss < estimate.anchor_loss < harmful_loss
    assert empty_loss == pytest.approx(estimate.anchor_loss)

    top = h.stub.SelectTasks(pb.SelectTasksRequest(
        job="job", method=pb.SELECTION_METHOD_TOP_K, k=2))
    assert sorted(top.selected) == sorted(HELPFUL)
    assert top.estimated_loss < top.anchor_loss
    forward = h.stub.SelectTasks(pb.SelectTasksRequest(
        job="job", method=pb.SELECTION_METHOD_FORWARD))
    assert set(forward.selected) <= set(HELPFUL) and forward.selected
    threshold = h.stub.SelectTasks(pb.SelectTasksRequest(job="job", threshold=0.0))
    assert set(threshold.selected) == set(HELPFUL)


def test_restart_keeps_versions_and_a_resumed_watch_gets_the_next_one(tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    create_job(h.stub)
    register(h)
    sketch_anchor(h)
    before = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                      lambda m: all_active(m, HELPFUL + HARMFUL), "active mixture")
    assert isinstance(before, pb.Mixture)
    h.close()

    h = start(tmp_path / "store")
    try:
        after = h.stub.GetMixture(pb.GetMixtureRequest(job="job"))
        assert after == before
        # The rebuilt estimator reproduces the same weights: no new version appears.
        wait_for(lambda: h.registry.get_sample_value(
            "gradmix_estimation_duration_seconds_count", {"gradmix_job": "job"}),
            lambda n: bool(n), "the start-up re-estimate")
        assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")).version == before.version
        replay = Watcher(h.stub, "job", after_version=before.version - 1)
        assert replay.next().version == before.version
        watcher = Watcher(h.stub, "job", after_version=before.version)
        neutral = PLANTED.names("neutral")[0]
        register(h, (neutral,))
        nxt = watcher.next()
        assert nxt.version == before.version + 1
        assert list(nxt.pending_tasks) == [neutral]
        assert replay.next() == nxt
        watcher.cancel()
        replay.cancel()
    finally:
        h.close()


def test_a_burst_of_commits_costs_one_reestimate_and_no_change_no_version(
        tmp_path: Path) -> None:
    h = start(tmp_path / "store", debounce_seconds=2.0)
    try:
        # A temperature (in units of the scores' σ) that keeps every weight off the
        # floor and the cap: the burst's rows then move the weights whatever the
        # bootstrap draws, so the burst must publish a version.
        create_job(h.stub, temperature=20.0)
        register(h)
        sketch_anchor(h)

        def estimates() -> float:
            return h.registry.get_sample_value(
                "gradmix_estimation_duration_seconds_count", {"gradmix_job": "job"}) or 0.0

        settled = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                           lambda m: all_active(m, HELPFUL + HARMFUL), "active mixture")
        assert isinstance(settled, pb.Mixture)
        wait_for(lambda: h.registry.get_sample_value("gradmix_tasks", {
            "gradmix_job": "job", "state": "active"}), lambda n: n == 4, "the settled task gauge")
        runs = estimates()
        watcher = Watcher(h.stub, "job", after_version=settled.version)
        grads, values, ids = PLANTED.rows(HELPFUL[0])
        extra = (grads, values, ids + 1000)  # new example ids: new rows for any task
        for i, task in enumerate(HELPFUL + HARMFUL):  # one burst, well inside the debounce
            commit_via_store(h, "job", "a0", task, extra, writer=f"b{i}")
        burst = watcher.next()
        assert burst.version == settled.version + 1
        assert estimates() == runs + 1

        # The same rows again: re-sent example ids are not stored twice, the
        # re-estimate finds the same weights, and no version is published.
        commit_via_store(h, "job", "a0", HELPFUL[0], extra, writer="b9")
        wait_for(estimates, lambda n: n == runs + 2, "the second re-estimate")
        assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")).version == burst.version
        watcher.cancel()
    finally:
        h.close()
