"""server/calibration.py: the horizon prior λ₀ and the online correction of λ = λ₀·c."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradmix.server import calibration as cal
from gradmix.server.estimator import SubsetEstimator
from gradmix.store import CalibrationRecord, Horizon, MixtureRecord


def record(*, anchor: str = "a0", anchor_loss: float = 0.70, estimated_loss: float = 0.60,
           factor: float | None = 1.0, observations: int = 0,
           states: dict[str, str] | None = None) -> MixtureRecord:
    calibration = None if factor is None else CalibrationRecord(
        regularization=2.0 * factor, prior=2.0, factor=factor, observations=observations)
    return MixtureRecord(version=3, created_at=1.0, anchor=anchor, policy="ensemble",
                         weights={"t": 1.0}, scores={"t": -0.1},
                         states=states or {"t": "active"}, anchor_loss=anchor_loss,
                         estimated_loss=estimated_loss, calibration=calibration)


# ------------------------------------------------------------------ the prior


def test_sgd_prior_is_one_over_lr_times_steps() -> None:
    prior = cal.prior_regularization(Horizon(learning_rate=0.01, steps=50, optimizer="SGD"),
                                     [3.0], configured=1.0)
    assert prior == cal.Prior(pytest.approx(2.0), "sgd")  # type: ignore[arg-type]
    # Twice the steps: the run moves twice as far, λ₀ halves.
    longer = cal.prior_regularization(Horizon(learning_rate=0.01, steps=100, optimizer="sgd"),
                                      [], configured=1.0)
    assert longer.value == pytest.approx(prior.value / 2)


def test_adam_prior_uses_the_harmonic_mean_of_task_gradient_norms() -> None:
    horizon = Horizon(learning_rate=1e-3, steps=100, optimizer="adamw", parameters=10_000)
    norms = [1.0, 4.0, 0.0]  # a zero gradient carries no scale: left out
    prior = cal.prior_regularization(horizon, norms, configured=1.0)
    harmonic = 2 / (1 / 1.0 + 1 / 4.0)
    assert prior.source == "adam"
    assert prior.value == pytest.approx(harmonic / (1e-3 * 100 * math.sqrt(10_000)))
    assert cal.harmonic_mean([2.0, 2.0]) == pytest.approx(2.0)
    assert cal.harmonic_mean([0.0, math.nan]) is None
    # "adam" is Adam-type too; a 4x larger p moves ‖Δθ‖ twice as far.
    wider = cal.prior_regularization(Horizon(learning_rate=1e-3, steps=100, optimizer="adam",
                                             parameters=40_000), norms, configured=1.0)
    assert wider.value == pytest.approx(prior.value / 2)


@pytest.mark.parametrize(("horizon", "norms", "reason"), [
    (None, [1.0], "no horizon"),
    (Horizon(learning_rate=1e-3, steps=10, optimizer="lamb"), [1.0], "unknown optimizer"),
    (Horizon(learning_rate=1e-3, steps=10, optimizer="adamw"), [1.0], "parameter count"),
    (Horizon(learning_rate=1e-3, steps=10, optimizer="adamw", parameters=5), [], "gradient"),
])
def test_without_a_usable_horizon_the_prior_is_the_configured_lambda(
        horizon: Horizon | None, norms: list[float], reason: str) -> None:
    prior = cal.prior_regularization(horizon, norms, configured=0.7)
    assert prior.value == 0.7
    assert prior.source.startswith("configured") and reason in prior.source


def test_gradient_norms_are_the_estimators_task_mean_loss_gradients() -> None:
    rng = np.random.default_rng(0)
    estimator = SubsetEstimator(4)
    estimator.add_task_rows("a", rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=8))
    estimator.add_task_rows("b", rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=8))
    norms = cal.gradient_norms(estimator)
    assert norms == pytest.approx([np.linalg.norm(estimator.statistics(t).loss_gradient())
                                   for t in ("a", "b")])
    assert cal.gradient_norms(None) == []


# -------------------------------------------------------------- the correction


def test_a_larger_realised_fall_than_predicted_lowers_lambda_by_a_damped_step() -> None:
    # Predicted -0.1, realised -0.4: λ should have been 4x smaller; half the log step.
    c = cal.correct(1.0, 0, predicted=-0.1, realized=-0.4)
    assert c.factor == pytest.approx(0.5)
    assert (c.observations, c.ratio) == (1, pytest.approx(4.0))
    assert c.note.startswith("corrected")
    # The other way: the loss fell less than predicted, λ grows.
    up = cal.correct(0.5, 1, predicted=-0.4, realized=-0.1)
    assert up.factor == pytest.approx(1.0)
    assert up.observations == 2


def test_the_step_is_clipped_per_update_and_the_factor_overall() -> None:
    huge = cal.correct(1.0, 0, predicted=-1e-6, realized=-1.0)  # ratio 1e6, clipped to 10
    assert huge.factor == pytest.approx(1 / math.sqrt(10))
    assert huge.ratio == pytest.approx(1e6)
    tiny = cal.correct(1.0, 0, predicted=-1.0, realized=-1e-6)
    assert tiny.factor == pytest.approx(math.sqrt(10))
    assert cal.correct(1.2e-3, 5, predicted=-1e-3, realized=-1.0).factor == cal.FACTOR_MIN
    assert cal.correct(900.0, 5, predicted=-1.0, realized=-1e-3).factor == cal.FACTOR_MAX


@pytest.mark.parametrize(("predicted", "realized", "why"), [
    (-0.1, 0.05, "did not fall"),         # the loss rose
    (-0.1, 0.0, "did not fall"),
    (0.02, -0.3, "not predicted"),        # the mixture was not predicted to help
    (0.0, -0.3, "not predicted"),
    (-0.1, math.nan, "not finite"),
])
def test_nothing_changes_unless_both_changes_are_negative(
        predicted: float, realized: float, why: str) -> None:
    c = cal.correct(0.8, 3, predicted=predicted, realized=realized)
    assert (c.factor, c.observations) == (0.8, 3)
    assert why in c.note


def test_the_realised_change_is_rescaled_to_the_planned_horizon() -> None:
    assert cal.interval_scale(100, 50) == 2.0
    assert cal.interval_scale(0, 50) == cal.interval_scale(100, 0) == 1.0
    # Half the planned steps went by and the loss fell by what was predicted for all of
    # them: the run moves twice as fast as the prior thinks.
    c = cal.correct(1.0, 0, predicted=-0.1, realized=-0.1, scale=cal.interval_scale(100, 50))
    assert c.ratio == pytest.approx(2.0)
    assert c.factor == pytest.approx(1 / math.sqrt(2))


# ---------------------------------------------------------------- calibrate()


def test_calibrate_continues_from_the_previous_anchors_factor() -> None:
    previous = record(anchor_loss=0.70, estimated_loss=0.60, factor=0.5, observations=2)
    out = cal.calibrate(configured=1.0, horizon=Horizon(learning_rate=0.01, steps=50,
                                                        optimizer="sgd"),
                        norms=[], previous=previous, anchor_loss=0.30)
    # predicted -0.1, realised -0.4 → factor 0.5 · √(1/4) = 0.25, λ = λ₀(2) · 0.25
    assert out.factor == pytest.approx(0.25)
    assert out.observations == 3
    assert (out.prior, out.prior_source) == (pytest.approx(2.0), "sgd")
    assert out.regularization == pytest.approx(0.5)
    assert out.predicted_change == pytest.approx(-0.1)
    assert out.realized_change == pytest.approx(-0.4)
    assert out.ratio == pytest.approx(4.0)


def test_calibrate_keeps_the_factor_when_there_is_nothing_to_compare() -> None:
    first = cal.calibrate(configured=1.5, horizon=None, norms=[], previous=None, anchor_loss=0.5)
    assert (first.regularization, first.factor, first.observations) == (1.5, 1.0, 0)
    assert "no earlier anchor" in first.note
    waiting = cal.calibrate(configured=1.0, horizon=None, norms=[],
                            previous=record(factor=0.3, observations=1), anchor_loss=None)
    assert (waiting.factor, waiting.observations) == (0.3, 1)
    assert "no target rows" in waiting.note
    unsketched = cal.calibrate(configured=1.0, horizon=None, norms=[],
                               previous=record(states={"t": "pending"}), anchor_loss=0.1)
    assert unsketched.factor == 1.0 and "no estimate" in unsketched.note
    # A version stored before calibration existed counts as factor 1, no observations.
    old = cal.calibrate(configured=1.0, horizon=None, norms=[], previous=record(factor=None),
                        anchor_loss=0.30)
    assert (old.factor, old.observations) == (pytest.approx(0.5), 1)


def test_lambda_stays_in_range_whatever_the_prior() -> None:
    out = cal.calibrate(configured=1.0, horizon=Horizon(learning_rate=1e-12, steps=1,
                                                        optimizer="sgd"),
                        norms=[], previous=None, anchor_loss=0.5)
    assert out.prior == pytest.approx(1e12)
    assert out.regularization == cal.REGULARIZATION_MAX
