"""Work that cannot starve others, paging, shutdown, and a job that never freezes.

A real server on loopback and the real client; one fault is injected in-process
(a re-estimate that fails numerically), because no input within the bounds is
known to make the estimator fail.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gradmix.client import SelectionClient
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server import jobstate
from server_support import (
    Harness,
    Watcher,
    commit_via_store,
    create_job,
    random_rows,
    start,
    wait_for,
)
from test_server_errors import refused

Code = grpc.StatusCode


@pytest.fixture
def paged(tmp_path: Path) -> Iterator[Harness]:
    h = start(tmp_path / "store", default_page_size=2, max_page_size=3)
    yield h
    h.close()


def test_every_list_call_pages_and_the_client_reads_every_page(paged: Harness) -> None:
    stub = paged.stub
    for name in ("j5", "j1", "j4", "j2", "j3"):
        create_job(stub, name=name)
    for i in range(5):
        stub.RegisterTask(pb.RegisterTaskRequest(job="j1", name=f"t{i}"))
        stub.DeclareAnchor(pb.DeclareAnchorRequest(job="j1", anchor=f"a{i}", step=i + 1))
    first = stub.ListJobs(pb.ListJobsRequest())
    assert [j.name for j in first.jobs] == ["j1", "j2"] and first.next_page_token
    assert len(stub.ListJobs(pb.ListJobsRequest(page_size=100)).jobs) == 3  # max_page_size
    second = stub.ListJobs(pb.ListJobsRequest(page_token=first.next_page_token))
    assert [j.name for j in second.jobs] == ["j3", "j4"]
    refused(lambda: stub.ListJobs(pb.ListJobsRequest(page_token="not a token")),
            Code.INVALID_ARGUMENT, "page_token")
    refused(lambda: stub.ListTasks(pb.ListTasksRequest(job="j1",
                                                       page_token=first.next_page_token)),
            Code.INVALID_ARGUMENT, "page_token")
    wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job="j1")),
             lambda m: len(m.weights) == 5, "a mixture of all five tasks")
    with SelectionClient(paged.server.address) as client:
        assert [j.name for j in client.list_jobs()] == ["j1", "j2", "j3", "j4", "j5"]
        assert [t.name for t in client.list_tasks("j1")] == [f"t{i}" for i in range(5)]
        assert [a.name for a in client.list_anchors("j1")] == [f"a{i}" for i in range(5)]
        versions = [m.version for m in client.list_mixtures("j1")]
        assert versions == list(range(1, versions[-1] + 1))
        assert [m.version for m in client.list_mixtures("j1", limit=1)] == [1]
        if len(versions) > 2:
            assert [m.version for m in client.list_mixtures("j1", after_version=1, limit=2)
                    ] == [2, 3]


def test_watch_streams_end_unavailable_when_the_server_stops(tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    try:
        create_job(h.stub)
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name="t1"))
        watcher = Watcher(h.stub, "job")
        watcher.next()
        h.server.stop(grace=2.0)
        watcher._thread.join(timeout=10.0)
        assert watcher.error is not None, "the stream ended with OK"
        assert watcher.error.code() == Code.UNAVAILABLE, watcher.error.details()
    finally:
        h.close()


def test_a_failing_estimate_keeps_the_last_mixture_and_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = threading.Event()
    compose = jobstate.compose_mixture

    def flaky(*args: object, **kwargs: object) -> object:
        if failing.is_set():
            raise FloatingPointError("overflow in the injected estimate")
        return compose(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jobstate, "compose_mixture", flaky)
    h = start(tmp_path / "store")
    try:
        stub = h.stub
        create_job(stub)
        for task in ("t1", "t2"):
            stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
        stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="a1", step=1))
        commit_via_store(h, "job", "a1", None, random_rows(16, seed=1))
        commit_via_store(h, "job", "a1", "t1", random_rows(16, seed=2))
        stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor="a1"))
        before = wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job")),
                          lambda m: m.anchor == "a1", "a mixture at a1")
        failing.set()
        commit_via_store(h, "job", "a1", "t2", random_rows(16, seed=3))
        job = wait_for(lambda: stub.GetJob(pb.GetJobRequest(name="job")),
                       lambda j: j.estimation_error, "the failure reported")
        assert "FloatingPointError" in job.estimation_error  # type: ignore[attr-defined]
        assert stub.GetMixture(pb.GetMixtureRequest(job="job")) == before
        failures = h.registry.get_sample_value("gradmix_estimation_failures_total",
                                               {"gradmix_job": "job"})
        assert failures is not None and failures >= 1
        failing.clear()
        commit_via_store(h, "job", "a1", "t2", random_rows(4, seed=4, first_id=100),
                         writer="w1")
        after = wait_for(lambda: stub.GetMixture(pb.GetMixtureRequest(job="job")),
                         lambda m: "t2" not in m.pending_tasks, "t2 active after recovery")
        assert after.version > before.version
        assert stub.GetJob(pb.GetJobRequest(name="job")).estimation_error == ""
    finally:
        h.close()


# ------------------------------------------------------------------ heavy queries

TASKS = [f"t{i}" for i in range(12)]


@pytest.fixture
def heavy(tmp_path: Path) -> Iterator[Harness]:
    """Job "heavy" (12 tasks, 200 rows each, dim 32) for exact queries; job "light"."""
    h = start(tmp_path / "store", query_workers=1, max_queued_queries=8,
              max_exact_query_cost=100_000)
    stub = h.stub
    create_job(stub, name="heavy", dim=32)
    create_job(stub, name="light")
    for name in ("heavy", "light"):
        for task in TASKS:
            stub.RegisterTask(pb.RegisterTaskRequest(job=name, name=task))
    stub.DeclareAnchor(pb.DeclareAnchorRequest(job="heavy", anchor="a1", step=1))
    commit_via_store(h, "heavy", "a1", None, random_rows(200, dim=32, seed=1))
    for i, task in enumerate(TASKS):
        commit_via_store(h, "heavy", "a1", task, random_rows(200, dim=32, seed=10 + i))
    stub.CompleteAnchor(pb.CompleteAnchorRequest(job="heavy", anchor="a1"))
    yield h
    h.close()


def exact_request(subsets: int) -> pb.EstimateSubsetsRequest:
    chosen = [pb.Subset(tasks=TASKS[i % 6:i % 6 + 6]) for i in range(subsets)]
    return pb.EstimateSubsetsRequest(job="heavy", subsets=chosen, mode=pb.ESTIMATE_MODE_EXACT)


def timed(call: object) -> float:
    start_ = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - start_


def test_query_cost_is_bounded_per_call(heavy: Harness) -> None:
    refused(lambda: heavy.stub.EstimateSubsets(exact_request(100_000 // 12 + 1)),
            Code.RESOURCE_EXHAUSTED, "max_exact_query_cost")


def test_a_cancelled_query_stops_its_work(heavy: Harness) -> None:
    """One query thread: after a long query is cancelled, the next query runs at once."""
    stub = heavy.stub
    for subsets in (150, 300, 600):  # a query long enough to cancel, on a fast machine too
        full = timed(lambda: stub.EstimateSubsets(exact_request(subsets)))  # noqa: B023
        if full > 0.15:
            break
    assert full > 0.15, f"the heavy query took only {full:.3f} s: not heavy enough to test"
    started = time.perf_counter()
    future = stub.EstimateSubsets.future(exact_request(10 * subsets))  # ~10 × full
    time.sleep(0.1)
    future.cancel()
    stub.EstimateSubsets(exact_request(1))
    waited = time.perf_counter() - started
    assert waited < 5 * full, f"the next query waited {waited:.2f} s (full query {full:.2f} s)"


def test_a_query_past_its_deadline_is_stopped(heavy: Harness) -> None:
    stub = heavy.stub
    with pytest.raises(grpc.RpcError) as info:
        stub.EstimateSubsets(exact_request(600), timeout=0.3)
    assert info.value.code() == Code.DEADLINE_EXCEEDED
    assert timed(lambda: stub.EstimateSubsets(exact_request(1))) < 5.0


def test_cheap_calls_stay_fast_while_heavy_queries_run(heavy: Harness) -> None:
    stub = heavy.stub

    def list_latencies() -> list[float]:
        return [timed(lambda: stub.ListTasks(pb.ListTasksRequest(job="light")))
                for _ in range(20)]

    idle = statistics.median(list_latencies())
    futures = [stub.EstimateSubsets.future(exact_request(60)) for _ in range(8)]
    time.sleep(0.05)
    busy = list_latencies()
    running = sum(not f.done() for f in futures)
    for future in futures:
        future.cancel()
    assert running >= 1, "the heavy queries ended before the cheap calls were measured"
    # ListTasks reads the store on the default executor; heavy queries have their own pool,
    # so not even the first ListTasks waits for a heavy query to end.
    assert max(busy) < 20 * idle + 0.1, (
        f"ListTasks took up to {max(busy) * 1e3:.1f} ms while heavy queries ran, "
        f"{idle * 1e3:.1f} ms when idle")
