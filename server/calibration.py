"""Calibration of the estimate's horizon λ from the run itself.

The estimator's ridge weight λ (DESIGN.md §4) stands in for how far
fine-tuning moves from the anchor. In the fast mode

    w_S = −(H_S + λI)⁻¹ b_S  ≈  −b_S / λ      (λ large against H_S)

so in the near-linear regime the estimated change L̂(S) − L̂(∅) scales like
1/λ. For each anchor the server sets λ = λ₀ · c.

**A-priori λ₀ from the trainer's horizon.** The trainer declares an anchor
with its horizon (`gradmix.store.Horizon`): the learning rate η, the steps T
until the next anchor, the optimizer, and p, the number of sketched
parameters.

* SGD: T steps at rate η move θ by Δθ ≈ −ηT·∇L (the gradient held at its
  anchor value). The sketch rows are P·g with P a Johnson–Lindenstrauss
  projection (entries ±1/√d, so inner products are preserved in
  expectation), so the projected move is P·Δθ ≈ −ηT·b_S, which the ridge step
  −b_S/λ matches at λ₀ = 1/(ηT).
* Adam-type ("adam", "adamw"): the update m̂/√v̂ is ≈ ±1 per coordinate
  whatever the gradient's scale, so each coordinate moves ≈ η per step and
  ‖Δθ‖ ≈ ηT·√p (an upper end: it assumes every coordinate keeps its sign),
  and ‖P·Δθ‖ ≈ ‖Δθ‖. Matching ‖b_S‖/λ to it gives λ₀ = ‖b_S‖/(ηT·√p). The
  policies weight a subset's tasks α_t ∝ 1/‖b_t‖, renormalised within it
  (`gradmix.server.policies.task_scales`), so b_S = Σ α_t b_t; for task
  gradients pointing one way ‖b_S‖ is exactly the harmonic mean of the ‖b_t‖
  in S. The harmonic mean over every sketched task at the anchor stands in
  for ‖b_S‖ (one λ per anchor, not one per subset).
* Another optimizer, an Adam-type horizon without p, no sketched task
  gradient yet, or no horizon at all: λ₀ = the job's `regularization` setting.

These are rough priors, right in scale at best: the gradient is not constant
over T steps, Adam's coordinates do not all keep their sign, the trainer's
loss is not exactly the sketched value's, and H_S is not negligible against
λ. The online correction below fixes what they get wrong.

**Online correction c.** When an anchor B becomes current, the last mixture
version estimated at the previous anchor A records what was predicted for the
mixture in force: p = L̂_A(mixture) − L_A, with L_A = L̂_A(∅) A's own target
loss. The run realised r = L_B − L_A (L_B = B's own target loss). If A's
horizon planned T steps and B came T' ≠ T steps after A, r is first rescaled
to r·T/T' (near-linear regime), so that it answers the horizon the prediction
was made for. When both are negative (the loss fell, and was predicted to),
and the prediction scales like 1/λ, λ should have been λ·p/r; c takes a damped
step towards that in log space:

    log c ← log c + ½·log(clip(p/r, 1/10, 10)),    c clipped to [1e-3, 1e3]

Otherwise (the loss rose, nothing was predicted to fall, no earlier anchor,
no target rows at B yet) c is kept and the note says why. The factor and the
observation count are stored in every mixture record (`CalibrationRecord`);
B's calibration is a pure function of A's last record and B's rows, so a
restarted server computes the same λ at B and continues from it at the next
anchor.

Only the published mixture uses the calibrated λ. Queries (EstimateSubsets,
SelectTasks) keep the job's configured λ: they answer "what would fine-tuning
on S do" at a horizon the user fixed with the job, and their answers should
not move when the run's calibration does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from gradmix.server.estimator import SubsetEstimator
from gradmix.store import CalibrationRecord, Horizon, MixtureRecord
from gradmix.vocabulary.policy_settings import PolicyConfig

__all__ = [
    "ADAM_OPTIMIZERS",
    "SGD_OPTIMIZERS",
    "Correction",
    "Prior",
    "adam_prior",
    "calibrate",
    "calibrated_policy",
    "correct",
    "gradient_norms",
    "harmonic_mean",
    "interval_scale",
    "prior_regularization",
    "sgd_prior",
]

#: Optimizer names (lower case) whose per-coordinate step is ≈ the learning rate.
ADAM_OPTIMIZERS = frozenset({"adam", "adamw"})
#: Optimizer names whose step is the learning rate times the gradient.
SGD_OPTIMIZERS = frozenset({"sgd"})
#: The observed ratio p/r moves c by at most this factor (before damping) per anchor.
RATIO_CLIP = 10.0
#: log c moves by this share of log(p/r) per observation.
DAMPING = 0.5
FACTOR_MIN = 1e-3
FACTOR_MAX = 1e3
#: λ = λ₀·c is kept in this range whatever the prior says (the solves need λ > 0).
REGULARIZATION_MIN = 1e-8
REGULARIZATION_MAX = 1e8


@dataclass(frozen=True)
class Prior:
    """λ₀ and where it came from ("sgd", "adam", or "configured (<reason>)")."""

    value: float
    source: str


@dataclass(frozen=True)
class Correction:
    """The calibration factor after one anchor interval.

    Attributes:
        factor: c after the interval.
        observations: intervals that corrected c so far.
        ratio: realized / predicted change (realized rescaled to the planned
            horizon); 0 when not comparable.
        note: whether c was corrected, and why not if it was not.
    """

    factor: float
    observations: int
    ratio: float
    note: str


def sgd_prior(learning_rate: float, steps: int) -> float:
    """λ₀ = 1/(ηT): T SGD steps at rate η move the projected θ by −ηT·b."""
    return 1.0 / (learning_rate * steps)


def adam_prior(learning_rate: float, steps: int, parameters: int, gradient_norm: float) -> float:
    """λ₀ = ‖b_S‖/(ηT·√p): T Adam steps move θ by ≈ ηT·√p, the ridge step by ‖b_S‖/λ."""
    return gradient_norm / (learning_rate * steps * math.sqrt(parameters))


def harmonic_mean(norms: Iterable[float]) -> float | None:
    """Harmonic mean of the positive finite norms (None if there are none)."""
    usable = [float(n) for n in norms if math.isfinite(n) and n > 0]
    if not usable:
        return None
    return len(usable) / sum(1.0 / n for n in usable)


def gradient_norms(estimator: SubsetEstimator | None) -> list[float]:
    """‖b_t‖ of every task with rows in `estimator` (b_t its mean loss gradient)."""
    if estimator is None:
        return []
    return [float(np.linalg.norm(estimator.statistics(t).loss_gradient()))
            for t in estimator.tasks]


def prior_regularization(horizon: Horizon | None, norms: Iterable[float],
                         configured: float) -> Prior:
    """λ₀ for an anchor: from its horizon, else the job's configured λ.

    Args:
        horizon: the anchor's declared horizon (None: none declared).
        norms: ‖b_t‖ of the tasks sketched at the anchor (Adam-type only).
        configured: the job's `regularization` setting.
    """
    if horizon is None:
        return Prior(configured, "configured (no horizon declared)")
    name = horizon.optimizer.lower()
    if name in SGD_OPTIMIZERS:
        return _usable(sgd_prior(horizon.learning_rate, horizon.steps), "sgd", configured)
    if name in ADAM_OPTIMIZERS:
        if horizon.parameters <= 0:
            return Prior(configured, "configured (the horizon gives no parameter count)")
        norm = harmonic_mean(norms)
        if norm is None:
            return Prior(configured, "configured (no task gradient sketched yet)")
        return _usable(adam_prior(horizon.learning_rate, horizon.steps, horizon.parameters,
                                  norm), "adam", configured)
    return Prior(configured, f"configured (unknown optimizer {horizon.optimizer!r})")


def _usable(value: float, source: str, configured: float) -> Prior:
    if math.isfinite(value) and value > 0:
        return Prior(value, source)
    return Prior(configured, f"configured (the {source} prior {value!r} is unusable)")


def interval_scale(planned_steps: int, actual_steps: int) -> float:
    """T/T': what the realized change over T' steps is multiplied by to answer a T-step
    prediction (1 when either is unknown)."""
    if planned_steps > 0 and actual_steps > 0:
        return planned_steps / actual_steps
    return 1.0


def correct(factor: float, observations: int, *, predicted: float, realized: float,
            scale: float = 1.0) -> Correction:
    """One damped log-space step of c from an anchor interval.

    Args:
        factor, observations: c and its observation count before the interval.
        predicted: p = L̂_A(mixture in force) − L̂_A(∅) at the earlier anchor.
        realized: r = L_B − L_A, the target loss change the run realised.
        scale: `interval_scale` of the interval (r is multiplied by it).
    """
    effective = realized * scale
    if not (math.isfinite(predicted) and math.isfinite(effective)):
        return Correction(factor, observations, 0.0, "not corrected: a loss is not finite")
    ratio = effective / predicted if predicted != 0 else 0.0
    if predicted >= 0:
        return Correction(factor, observations, ratio,
                          f"not corrected: the mixture in force was not predicted to lower "
                          f"the target loss (predicted {predicted:+.4g})")
    if effective >= 0:
        return Correction(factor, observations, ratio,
                          f"not corrected: the target loss did not fall "
                          f"(realized {effective:+.4g}, predicted {predicted:+.4g})")
    step = min(max(predicted / effective, 1.0 / RATIO_CLIP), RATIO_CLIP)
    updated = math.exp(math.log(factor) + DAMPING * math.log(step))
    updated = min(max(updated, FACTOR_MIN), FACTOR_MAX)
    return Correction(updated, observations + 1, ratio,
                      f"corrected: realized/predicted {ratio:.3g}, factor {factor:.4g} -> "
                      f"{updated:.4g}")


def _has_estimate(record: MixtureRecord) -> bool:
    return any(state == "active" for state in record.states.values())


def calibrate(*, configured: float, horizon: Horizon | None, norms: Iterable[float],
              previous: MixtureRecord | None, anchor_loss: float | None,
              scale: float = 1.0) -> CalibrationRecord:
    """λ for the current anchor: its prior, corrected by the interval since `previous`.

    Args:
        configured: the job's `regularization` setting.
        horizon: the current anchor's horizon (None: none declared).
        norms: ‖b_t‖ of the tasks sketched at the current anchor.
        previous: the last version estimated at the previous anchor (None: none).
        anchor_loss: L̂(∅) at the current anchor (None: no target rows yet).
        scale: `interval_scale` of the interval from the previous anchor.
    """
    prior = prior_regularization(horizon, norms, configured)
    known = previous.calibration if previous is not None else None
    factor = known.factor if known is not None else 1.0
    observations = known.observations if known is not None else 0
    predicted = realized = 0.0
    if previous is None:
        correction = Correction(factor, observations, 0.0,
                                "not corrected: no earlier anchor to compare with")
    elif not _has_estimate(previous):
        correction = Correction(factor, observations, 0.0,
                                f"not corrected: the mixture in force at {previous.anchor!r} "
                                "had no estimate (no sketched task)")
    elif anchor_loss is None:
        correction = Correction(factor, observations, 0.0,
                                "not corrected: no target rows at this anchor yet")
    else:
        predicted = previous.estimated_loss - previous.anchor_loss
        realized = anchor_loss - previous.anchor_loss
        correction = correct(factor, observations, predicted=predicted, realized=realized,
                             scale=scale)
    lam = min(max(prior.value * correction.factor, REGULARIZATION_MIN), REGULARIZATION_MAX)
    return CalibrationRecord(
        regularization=lam, prior=prior.value, prior_source=prior.source,
        factor=correction.factor, observations=correction.observations,
        predicted_change=predicted, realized_change=realized, ratio=correction.ratio,
        note=correction.note)


def calibrated_policy(policy: PolicyConfig, *, horizon: Horizon | None,
                      estimator: SubsetEstimator | None, previous: MixtureRecord | None,
                      scale: float = 1.0) -> tuple[PolicyConfig, CalibrationRecord]:
    """The job's policy with λ calibrated for the current anchor, and how λ was set.

    Args:
        policy: the job's settings (its `regularization` is the configured λ).
        horizon: the current anchor's horizon (None: none declared).
        estimator: the current anchor's rows (None: none yet).
        previous: the last version estimated at the previous anchor (None: none).
        scale: `interval_scale` of the interval from the previous anchor.
    """
    loss = estimator.anchor_loss() if estimator is not None and estimator.has_target else None
    calibration = calibrate(configured=policy.regularization, horizon=horizon,
                            norms=gradient_norms(estimator), previous=previous,
                            anchor_loss=loss, scale=scale)
    return dataclasses.replace(policy, regularization=calibration.regularization), calibration
