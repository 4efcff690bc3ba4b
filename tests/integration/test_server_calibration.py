"""λ calibrated from the run against a real server: the horizon prior, the online
correction across anchors, its visibility (message, client, CLI table, gauges), and its
survival across a restart."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradmix.client import Horizon, SelectionClient
from gradmix.client.render import mixture_table, text
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server import calibration as cal
from gradmix.server.estimator import SubsetEstimator
from server_support import (
    Harness,
    Planted,
    commit_via_store,
    create_job,
    serve,
    start,
    states,
    wait_for,
)

PLANTED = Planted(helpful=2, harmful=2)
TASKS = tuple(sorted(PLANTED.labels))
#: SGD at 0.01 for 100 steps: λ₀ = 1/(0.01·100) = 1.
SGD = pb.Horizon(learning_rate=0.01, steps=100, optimizer="sgd")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield from serve(tmp_path)


def sketch_anchor(h: Harness, anchor: str, step: int, *, shift: float,
                  horizon: pb.Horizon | None = SGD) -> None:
    """Declare `anchor`, commit the planted target (values raised by `shift`: the
    run's target loss fell by that much in log-odds) and every task, complete it."""
    request = pb.DeclareAnchorRequest(job="job", anchor=anchor, step=step)
    if horizon is not None:
        request.horizon.CopyFrom(horizon)
    h.stub.DeclareAnchor(request)
    grads, values, ids = PLANTED.rows(None)
    commit_via_store(h, "job", anchor, None, (grads, values + shift, ids))
    for task in TASKS:
        commit_via_store(h, "job", anchor, task, PLANTED.rows(task))
    h.stub.CompleteAnchor(pb.CompleteAnchorRequest(job="job", anchor=anchor))


def settled_at(h: Harness, anchor: str) -> pb.Mixture:
    """The latest version once the mixture at `anchor` has every task active."""
    def ready(m: object) -> bool:
        assert isinstance(m, pb.Mixture)
        s = states(m)
        return m.anchor == anchor and all(s.get(t) == pb.TASK_STATE_ACTIVE for t in TASKS)
    mixture = wait_for(lambda: h.stub.GetMixture(pb.GetMixtureRequest(job="job")), ready,
                       f"an active mixture at {anchor}")
    assert isinstance(mixture, pb.Mixture)
    return mixture


def last_at(h: Harness, anchor: str) -> pb.Mixture:
    """The last version estimated at `anchor` (the mixture in force when the next came)."""
    history = h.stub.ListMixtures(pb.ListMixturesRequest(job="job")).mixtures
    return [m for m in history if m.anchor == anchor][-1]


def gauge(h: Harness, name: str) -> float:
    value = h.registry.get_sample_value(name, {"gradmix_job": "job"})
    return math.nan if value is None else value


def expected_factor(before: float, predicted: float, realized: float) -> float:
    step = min(max(predicted / realized, 1 / cal.RATIO_CLIP), cal.RATIO_CLIP)
    return before * math.sqrt(step)


def test_lambda_follows_the_realised_loss_change_and_survives_a_restart(
        tmp_path: Path) -> None:
    h = start(tmp_path / "store")
    try:
        create_job(h.stub)
        for task in TASKS:
            h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))

        # Anchor a0: λ is the SGD prior, nothing to correct yet.
        sketch_anchor(h, "a0", 100, shift=0.0)
        first = settled_at(h, "a0").calibration
        assert first.regularization == pytest.approx(1.0)
        assert (first.prior_regularization, first.prior_source) == (pytest.approx(1.0), "sgd")
        assert (first.factor, first.observations) == (1.0, 0)
        assert "no earlier anchor" in first.note

        # Anchor a1, 100 steps on: the target loss fell by more than a0 predicted.
        sketch_anchor(h, "a1", 200, shift=2.0)
        second = settled_at(h, "a1")
        before = last_at(h, "a0")
        predicted = before.estimated_loss - before.anchor_loss
        realized = second.anchor_loss - before.anchor_loss
        assert realized < predicted < 0  # the premise: a larger fall than predicted
        c = second.calibration
        assert c.predicted_change == pytest.approx(predicted)
        assert c.realized_change == pytest.approx(realized)
        assert c.ratio == pytest.approx(realized / predicted)
        assert c.observations == 1
        assert c.factor == pytest.approx(expected_factor(1.0, predicted, realized))
        assert c.regularization == pytest.approx(c.prior_regularization * c.factor)
        assert c.regularization < before.calibration.regularization
        assert c.note.startswith("corrected")
        assert second.score_error > 0
        # Queries keep the job's configured λ (1): the mixture's own weights, estimated
        # through EstimateSubsets, move the loss less than at the calibrated λ (0.55).
        mix = {w.task: w.weight for w in second.weights}
        query = h.stub.EstimateSubsets(pb.EstimateSubsetsRequest(job="job", subsets=[
            pb.Subset(tasks=list(mix), weights=list(mix.values()))]))
        assert query.anchor_loss == pytest.approx(second.anchor_loss)
        assert second.estimated_loss < query.losses[0] < second.anchor_loss

        # The gauges show the version just published.
        wait_for(lambda: gauge(h, "gradmix_regularization"),
                 lambda v: v == pytest.approx(c.regularization), "the λ gauge")
        assert gauge(h, "gradmix_calibration_factor") == pytest.approx(c.factor)
        assert gauge(h, "gradmix_calibration_ratio") == pytest.approx(c.ratio)
        assert gauge(h, "gradmix_calibration_observations") == 1

        # The typed client and the CLI's table carry it too.
        with SelectionClient(h.server.address) as client:
            typed = client.get_mixture("job")
        assert typed.calibration is not None
        assert typed.calibration.regularization == pytest.approx(c.regularization)
        assert typed.calibration.factor == pytest.approx(c.factor)
        assert typed.calibration.prior_source == "sgd"
        assert typed.score_error == pytest.approx(second.score_error)
        assert f"factor {c.factor:.4g}" in text(mixture_table(typed)).splitlines()[-1]
        settled = h.stub.GetMixture(pb.GetMixtureRequest(job="job"))
    finally:
        h.close()

    # A restarted server on the same store: the same version and gauges, and the next
    # anchor corrects the persisted factor further instead of starting again from 1.
    h = start(tmp_path / "store")
    try:
        wait_for(lambda: gauge(h, "gradmix_estimation_duration_seconds_count"),
                 lambda n: isinstance(n, float) and n >= 1, "the start-up re-estimate")
        assert h.stub.GetMixture(pb.GetMixtureRequest(job="job")) == settled
        assert gauge(h, "gradmix_calibration_factor") == pytest.approx(c.factor)

        sketch_anchor(h, "a2", 300, shift=3.5)
        third = settled_at(h, "a2")
        before = last_at(h, "a1")
        assert before.calibration.factor == pytest.approx(c.factor)
        predicted = before.estimated_loss - before.anchor_loss
        realized = third.anchor_loss - before.anchor_loss
        assert predicted < 0 and realized < 0
        d = third.calibration
        assert d.observations == 2
        assert d.factor == pytest.approx(expected_factor(c.factor, predicted, realized))
        wait_for(lambda: gauge(h, "gradmix_calibration_observations"), lambda v: v == 2,
                 "the observation gauge after the restart")
        assert gauge(h, "gradmix_regularization") == pytest.approx(d.regularization)
    finally:
        h.close()


def test_a_rise_in_the_target_loss_keeps_the_factor_and_says_why(harness: Harness) -> None:
    h = harness
    create_job(h.stub, regularization=2.0)
    for task in TASKS:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    sketch_anchor(h, "a0", 0, shift=0.0, horizon=None)
    first = settled_at(h, "a0").calibration
    assert (first.regularization, first.prior_source) == (2.0, "configured (no horizon declared)")
    sketch_anchor(h, "a1", 10, shift=-1.0, horizon=None)
    c = settled_at(h, "a1").calibration
    assert (c.regularization, c.factor, c.observations) == (2.0, 1.0, 0)
    assert c.realized_change > 0 and "did not fall" in c.note


def test_a_declared_horizon_is_kept_with_the_anchor_and_sets_the_adam_prior(
        harness: Harness) -> None:
    h = harness
    create_job(h.stub)
    for task in TASKS:
        h.stub.RegisterTask(pb.RegisterTaskRequest(job="job", name=task))
    horizon = Horizon(learning_rate=3e-4, steps=50, optimizer="adamw", parameters=123_456)
    with SelectionClient(h.server.address) as client:
        declared = client.declare_anchor("job", "a0", 7, horizon=horizon)
        assert declared.horizon == horizon
        client.declare_anchor("job", "bare", 8)
        # A repeated declaration keeps the first horizon.
        again = client.declare_anchor("job", "a0", 7, horizon=Horizon(learning_rate=1.0,
                                                                     steps=1))
        assert again.horizon == horizon
        grads, values, ids = PLANTED.rows(None)
        commit_via_store(h, "job", "a0", None, (grads, values, ids))
        for task in TASKS:
            commit_via_store(h, "job", "a0", task, PLANTED.rows(task))
        client.complete_anchor("job", "a0")
        listed = {a.name: a for a in client.list_anchors("job")}
    assert listed["a0"].horizon == horizon and listed["a0"].state == "complete"
    assert listed["bare"].horizon is None
    stored = {a.name: a for a in h.store.list_anchors("job")}
    assert stored["a0"].horizon is not None and stored["a0"].horizon.parameters == 123_456
    assert stored["bare"].horizon is None

    # λ₀ = harmonic mean of the tasks' ‖b_t‖ / (lr · steps · √p).
    estimator = SubsetEstimator(PLANTED.sources[None][0].shape[1])
    for task in TASKS:
        grads, values, _ = PLANTED.rows(task)
        estimator.add_task_rows(task, grads, values)
    norms = [np.linalg.norm(estimator.statistics(t).loss_gradient()) for t in TASKS]
    harmonic = len(norms) / sum(1 / n for n in norms)
    expected = harmonic / (3e-4 * 50 * math.sqrt(123_456))
    c = settled_at(h, "a0").calibration
    assert c.prior_source == "adam"
    assert c.prior_regularization == pytest.approx(expected, rel=1e-3)  # float16 rows
    assert c.regularization == pytest.approx(c.prior_regularization)

    bad = pb.DeclareAnchorRequest(job="job", anchor="bad", step=9,
                                  horizon=pb.Horizon(learning_rate=0.0, steps=10,
                                                     optimizer="sgd"))
    with pytest.raises(grpc.RpcError) as error:
        h.stub.DeclareAnchor(bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
