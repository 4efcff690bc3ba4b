"""Anchors carry the run that declared them.

A second run of a job on the same store declares its own anchors; the job's
current anchor is the latest complete anchor of the run that started last,
whatever step the previous run reached, and no anchor is taken over by
another run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.jobstate import current_anchor
from gradmix.store import AnchorInfo, SketchSpec, SketchStore, SpecMismatchError
from server_support import Harness, Planted, commit_via_store, create_job, serve, wait_for

PLANTED = Planted(helpful=1, harmful=1)
TASKS = ("helpful-0", "harmful-0")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


def _anchor(h: Harness, name: str, step: int, run: str) -> None:
    horizon = pb.Horizon(learning_rate=1e-3, steps=100, optimizer="sgd", parameters=1000)
    declared = h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor=name, step=step,
                                                            run=run, horizon=horizon))
    assert declared.run == run
    for source in (None, *TASKS):
        commit_via_store(h, "job", name, source, PLANTED.rows(source))
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor=name))


def test_a_second_run_takes_over_at_its_first_anchor(harness: Harness) -> None:
    h = harness
    create_job(h.stub)
    for task in TASKS:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    _anchor(h, "first-00000300", 300, run="first")
    wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
             lambda m: m.anchor == "first-00000300", "mixture at the first run's anchor")  # type: ignore[attr-defined]
    # The job restarts from scratch: the new run's anchors start again at low steps.
    _anchor(h, "second-00000050", 50, run="second")
    mixture = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")),
                       lambda m: m.anchor == "second-00000050", "mixture at the new run's anchor")
    assert h.stub.GetJob(pb.GetJobRequest(name="job")).current_anchor == "second-00000050"
    # Its calibration never pairs the two runs' anchors.
    assert "no earlier anchor" in mixture.calibration.note  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as taken:
        h.stub.DeclareAnchor(pb.DeclareAnchorRequest(job="job", anchor="first-00000300",
                                                     step=300, run="second"))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "run" in (taken.value.details() or "")
    runs = {a.name: a.run for a in h.stub.ListAnchors(pb.ListAnchorsRequest(job="job")).anchors}
    assert runs == {"first-00000300": "first", "second-00000050": "second"}


def _info(name: str, step: int, run: str, at: float, state: str = "complete") -> AnchorInfo:
    return AnchorInfo(name, step, state, at, None, run)


def test_current_anchor_is_the_latest_complete_anchor_of_the_latest_run() -> None:
    first = [_info("f1", 100, "first", 1.0), _info("f2", 200, "first", 2.0)]
    assert current_anchor(first) == "f2"
    second = [_info("s1", 10, "second", 3.0), _info("s2", 20, "second", 4.0, "open")]
    assert current_anchor(first + second) == "s1"
    assert current_anchor([*first, second[1]]) == "f2"  # the new run has nothing complete yet
    # Without runs (older trainers) the highest complete step wins, as before.
    legacy = [_info("a", 100, "", 1.0), _info("b", 50, "", 2.0)]
    assert current_anchor(legacy) == "a"


def test_the_store_keeps_the_run_through_completion(tmp_path: Path) -> None:
    store = SketchStore.open(str(tmp_path / "store"))
    store.create_job("job", SketchSpec(dim=4, seed=0))
    store.declare_anchor("job", "a0", 10, run="r1")
    assert store.declare_anchor("job", "a0", 10, run="r1").run == "r1"  # idempotent
    with pytest.raises(SpecMismatchError, match="run"):
        store.declare_anchor("job", "a0", 10, run="r2")
    assert store.complete_anchor("job", "a0").run == "r1"
    assert [a.run for a in store.list_anchors("job")] == ["r1"]
