"""SelectionClient against the real server: every method, and its errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import (
    DIM,
    Planted,
    Served,
    create_job,
    mixture_or_none,
    serve,
    sketch_job,
    wait_for,
)
from gradmix.client import PolicySettings, SelectionClient, SketchSpec, SketchSpecError, errors
from gradmix.client.types import Mixture
from gradmix.trainer.config import SketchingConfig


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def _ranked(client: SelectionClient, job: str = "job") -> Mixture:
    """Wait until the job's mixture has the sketched tasks active."""

    def probe() -> Mixture | None:
        m = mixture_or_none(client, job)
        active = m is not None and m.states.get("help") == m.states.get("harm") == "active"
        return m if active else None

    return wait_for(probe, "a mixture with help and harm active")


def test_jobs_create_get_list_and_idempotence(served: Served) -> None:
    c = served.client
    sketch = SketchSpec(
        dim=DIM, seed=7, projector="structured", manifest_hash="abc", dtype="float32"
    )
    policy = PolicySettings(policy="surrogate", temperature=0.5, subset_count=64)
    job = c.create_job("job", sketch=sketch, policy=policy, target="val.jsonl")
    assert job.name == "job" and job.mixture_version == 0 and job.current_anchor == ""
    assert job.spec.sketch == sketch
    assert job.spec.target == "val.jsonl"
    assert job.spec.policy.policy == "surrogate" and job.spec.policy.temperature == 0.5
    assert c.create_job("job", sketch=sketch, policy=policy, target="val.jsonl").name == "job"
    assert c.get_job("job").spec.sketch == sketch
    create_job(c, "other")
    assert [j.name for j in c.list_jobs()] == ["job", "other"]


def test_job_errors_carry_status_codes(served: Served) -> None:
    c = served.client
    create_job(c)
    with pytest.raises(errors.AlreadyExists) as exists:
        c.create_job("job", sketch=SketchSpec(dim=DIM + 1, seed=7, dtype="float32"))
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "dim" in exists.value.details
    with pytest.raises(errors.NotFound) as missing:
        c.get_job("nope")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(errors.InvalidArgument) as bad:
        c.create_job("../escape", sketch=SketchSpec(dim=DIM))
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(SketchSpecError, match="invalid sketch dim: 0"):  # refused before any RPC
        SketchSpec(dim=0)


def test_value_kind_round_trips_and_a_job_never_mixes_kinds(served: Served) -> None:
    c = served.client
    geometric = SketchSpec(dim=DIM, seed=7, dtype="float32", value_kind="geometric_log_odds")
    created = c.create_job("geo", sketch=geometric)
    assert created.spec.sketch.value_kind == "geometric_log_odds"
    assert c.get_job("geo").spec.sketch == geometric
    assert c.create_job("geo", sketch=geometric).spec.sketch == geometric  # idempotent
    # Reopening the job with the other kind would pool values of two different f(x).
    with pytest.raises(errors.AlreadyExists) as exists:
        c.create_job("geo", sketch=dataclasses.replace(geometric, value_kind="log_odds"))
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "value_kind" in exists.value.details
    plain = c.create_job(
        "plain", sketch=SketchSpec(dim=DIM, seed=7, dtype="float32", value_kind="log_odds")
    )
    assert c.get_job(plain.name).spec.sketch.value_kind == "log_odds"
    # A spec that names no kind gets the one gradmix-train sketches by default.
    default = c.create_job("default", sketch=SketchSpec(dim=DIM, seed=7))
    assert default.spec.sketch.value_kind == SketchingConfig().value_kind
    assert default.spec.sketch.projector == SketchingConfig().projector
    with pytest.raises(errors.AlreadyExists, match="value_kind"):
        c.create_job("plain", sketch=geometric)
    with pytest.raises(SketchSpecError, match="value_kind"):  # refused before any RPC
        SketchSpec(dim=DIM, value_kind="mean_probability")


def test_tasks_register_list_and_errors(served: Served) -> None:
    c = served.client
    create_job(c)
    task = c.register_task("job", "b-task", {"uri": "s3://b"})
    assert (task.job, task.name, task.metadata, task.state) == (
        "job", "b-task", {"uri": "s3://b"}, "pending",
    )
    assert c.register_task("job", "b-task", {"uri": "s3://b"}).name == "b-task"
    c.register_task("job", "a-task")
    assert [t.name for t in c.list_tasks("job")] == ["b-task", "a-task"]  # registration order
    with pytest.raises(errors.AlreadyExists):
        c.register_task("job", "b-task", {"uri": "s3://other"})
    with pytest.raises(errors.NotFound):
        c.register_task("nope", "x")
    with pytest.raises(errors.NotFound):
        c.list_tasks("nope")
    with pytest.raises(errors.InvalidArgument):
        c.register_task("job", "bad/name")


def test_anchors_declare_complete_list_and_errors(served: Served) -> None:
    c = served.client
    create_job(c)
    anchor = c.declare_anchor("job", "a0", 100)
    assert (anchor.name, anchor.step, anchor.state) == ("a0", 100, "open")
    assert c.declare_anchor("job", "a0", 100).step == 100
    with pytest.raises(errors.AlreadyExists):
        c.declare_anchor("job", "a0", 200)
    with pytest.raises(errors.NotFound):
        c.complete_anchor("job", "never-declared")
    assert c.complete_anchor("job", "a0").state == "complete"
    assert [(a.name, a.state) for a in c.list_anchors("job")] == [("a0", "complete")]
    assert c.get_job("job").current_anchor == "a0"


def test_first_mixture_is_uniform_over_pending_tasks(served: Served) -> None:
    c = served.client
    create_job(c)
    with pytest.raises(errors.NotFound):
        c.get_mixture("job")  # no task, no mixture yet
    c.register_task("job", "x")
    c.register_task("job", "y")

    def over_both() -> list[Mixture] | None:
        history = c.list_mixtures("job")
        return history if history and len(history[-1].weights) == 2 else None

    latest = wait_for(over_both, "a mixture over both tasks")[-1]
    assert latest.weights == pytest.approx({"x": 0.5, "y": 0.5})
    assert set(latest.pending_tasks) == {"x", "y"}
    assert latest.states == {"x": "pending", "y": "pending"}
    assert c.get_mixture("job", version=1).version == 1
    with pytest.raises(errors.NotFound):
        c.get_mixture("job", version=999)
    history = c.list_mixtures("job")
    assert [m.version for m in history] == list(range(1, len(history) + 1))
    assert c.list_mixtures("job", after_version=1) == history[1:]


def test_sketches_estimates_and_selection(served: Served) -> None:
    c = served.client
    create_job(c)
    sketch_job(c)
    ranked = _ranked(c)
    assert ranked.weights["help"] > ranked.weights["harm"]
    assert ranked.scores["help"] < ranked.scores["harm"]
    assert {t.name: t.sketch_rows for t in c.list_tasks("job")} == {"help": 48, "harm": 48}
    assert c.list_anchors("job")[0].target_rows == 64

    result = c.estimate_subsets("job", [["help"], ["harm"], ["help", "harm"], []])
    assert result.anchor == "a0" and len(result.losses) == 4
    assert result.losses[3] == pytest.approx(result.anchor_loss)
    assert result.losses[0] < result.anchor_loss < result.losses[1]
    exact = c.estimate_subsets("job", [["help"]], mode="exact")
    assert exact.losses[0] < exact.anchor_loss
    weighted = c.estimate_subsets("job", [["help", "harm"]], weights=[[0.9, 0.1]])
    assert weighted.losses[0] < result.losses[2]

    assert c.select_tasks("job", "top_k", k=1).selected == ("help",)
    threshold = c.select_tasks("job", "threshold", threshold=0.0)
    assert "help" in threshold.selected and "harm" not in threshold.selected
    forward = c.select_tasks("job", "forward")
    assert forward.selected == ("help",) and forward.estimated_loss < forward.anchor_loss
    assert set(forward.scores) == {"help", "harm"}


def test_estimate_and_select_errors(served: Served) -> None:
    c = served.client
    create_job(c)
    c.register_task("job", "x")
    with pytest.raises(errors.FailedPrecondition):
        c.estimate_subsets("job", [["x"]])  # no complete anchor yet
    sketch_job(c)
    _ranked(c)
    with pytest.raises(errors.NotFound):
        c.estimate_subsets("job", [["no-such-task"]])
    with pytest.raises(errors.NotFound):
        c.estimate_subsets("nope", [["x"]])
    with pytest.raises(errors.InvalidArgument):
        c.estimate_subsets("job", [["help"]], mode="slow")
    with pytest.raises(errors.InvalidArgument):
        c.estimate_subsets("job", ["help"])  # a bare string is not a subset
    with pytest.raises(errors.InvalidArgument):
        c.select_tasks("job", "top_k", k=0)
    with pytest.raises(errors.InvalidArgument):
        c.select_tasks("job", "best")


def test_upload_errors_and_resent_rows(served: Served) -> None:
    c = served.client
    create_job(c)
    c.register_task("job", "x")
    c.declare_anchor("job", "a0", 0)
    grads, values, ids = Planted().rows("helpful", 10)
    assert c.upload_sketch("job", "a0", "x", "w0", grads, values, ids) == 10
    assert c.upload_sketch("job", "a0", "x", "w0", grads, values, ids) == 0  # re-sent ids
    with pytest.raises(errors.GradmixError) as wrong_dim:
        c.upload_sketch("job", "a0", "x", "w0", np.ones((2, DIM + 1)), np.zeros(2), [11, 12])
    assert wrong_dim.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # The same rows through the store path get the same code (one error table).
    from gradmix.client.sketch_writer import SketchWriter
    from gradmix.store import SketchStore

    direct = SketchWriter(c, "job", "a0", "x", "w1", store=SketchStore.open(str(served.store)))
    with pytest.raises(errors.InvalidArgument) as direct_dim:
        direct.write(np.ones((2, DIM + 1)), np.zeros(2), np.array([11, 12]))
    assert direct_dim.value.code == grpc.StatusCode.INVALID_ARGUMENT
    bad_values = values.copy()
    bad_values[0] = np.nan
    with pytest.raises(errors.InvalidArgument):
        c.upload_sketch("job", "a0", "x", "w0", grads, bad_values, ids + 100)
    with pytest.raises(errors.InvalidArgument):  # refused before any RPC
        c.upload_sketch("job", "a0", "x", "w0", grads, values[:3], ids)
    with pytest.raises(errors.NotFound):
        c.upload_sketch("job", "a1", "x", "w0", grads, values, ids)


def test_commit_sketch_reports_totals_and_errors(served: Served) -> None:
    from gradmix.store import SketchStore

    c = served.client
    create_job(c)
    c.register_task("job", "x")
    c.declare_anchor("job", "a0", 0)
    store = SketchStore.open(str(served.store))
    planted = Planted()
    for writer in ("rank-0", "rank-1"):
        result = store.writer("job", "a0", "x", writer).append(*planted.rows("helpful", 5))
        total = c.commit_sketch("job", "a0", "x", writer, result.committed)
    assert total == 10
    with pytest.raises(errors.GradmixError) as beyond:
        c.commit_sketch("job", "a0", "x", "rank-0", 999)  # more than the store holds
    assert beyond.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(errors.NotFound):
        c.commit_sketch("job", "a0", "nope", "rank-0", 1)


def test_closed_client_refuses_calls(served: Served) -> None:
    client = SelectionClient(served.address)
    client.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        client.list_jobs()


def test_dataclasses_are_frozen(served: Served) -> None:
    create_job(served.client)
    job = served.client.get_job("job")
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.name = "x"  # type: ignore[misc]
