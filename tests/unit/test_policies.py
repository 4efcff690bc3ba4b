"""Tests of selection policies, scores→mixture and discrete selection on planted data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradmix.demo.planted import HARMFUL, HELPFUL, planted_tasks
from gradmix.server.errors import InvalidArgumentError, NonFiniteError, PreconditionError
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.mixture import (
    cap_weights,
    scores_to_mixture,
    smooth_mixture,
    standard_error,
    task_errors,
)
from gradmix.server.policies import (
    POLICIES,
    compute_mixture,
    compute_scores,
    draw_subsets,
    score_error,
    task_scales,
)
from gradmix.server.selection import forward_selection, select_threshold, select_top_k
from gradmix.server.simplex import simplex_loss_and_gradient
from gradmix.vocabulary.policy_settings import PolicyConfig


def planted_estimator(seed: int, helpful: int = 4, harmful: int = 4, neutral: int = 2):
    target_g, target_f, tasks, labels = planted_tasks(helpful, harmful, neutral, 150, 24, seed)
    estimator = SubsetEstimator(24)
    estimator.add_target_rows(target_g, target_f)
    for name, (g, f) in tasks.items():
        estimator.add_task_rows(name, g, f)
    return estimator, labels


def of_kind(labels: dict[str, str], kind: str) -> list[str]:
    return [task for task, label in labels.items() if label == kind]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"uniform"}))
def test_every_informed_policy_ranks_helpful_tasks_above_harmful_ones(policy, seed):
    estimator, labels = planted_estimator(seed)
    scores = compute_scores(estimator, PolicyConfig(policy=policy, seed=seed))
    assert set(scores) == set(labels)
    worst_helpful = max(scores[t] for t in of_kind(labels, HELPFUL))
    best_harmful = min(scores[t] for t in of_kind(labels, HARMFUL))
    assert worst_helpful < best_harmful


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", ["ensemble", "surrogate", "simplex", "subset_search"])
def test_estimator_policies_put_most_mass_on_helpful_tasks(policy, seed):
    # 20 tasks, so the ensemble draws random subsets (C(20, 10) > 500).
    estimator, labels = planted_estimator(seed, helpful=6, harmful=8, neutral=6)
    _, weights = compute_mixture(estimator, PolicyConfig(policy=policy, seed=seed))
    assert sum(weights.values()) == pytest.approx(1.0)
    assert sum(weights[t] for t in of_kind(labels, HELPFUL)) >= 0.8


def test_ensemble_and_surrogate_scores_follow_their_definitions_on_the_drawn_subsets():
    estimator, _ = planted_estimator(8, helpful=5, harmful=5, neutral=5)
    config = PolicyConfig(subset_count=300, seed=3)
    subsets = draw_subsets(15, config)
    # Subsets are estimated with scale-normalised task weights α_t ∝ 1/‖b_t‖.
    losses = estimator.estimate(subsets, task_scales(estimator))
    ensemble = compute_scores(estimator, config)
    for j, task in enumerate(estimator.tasks):
        inside = subsets[:, j]
        assert ensemble[task] == pytest.approx(losses[inside].mean() - losses[~inside].mean())
    # 300 subsets ≫ 15 tasks: the ridge barely matters, so β ≈ least squares.
    # Subsets of one size identify β only up to a common shift: compare centred.
    design = np.column_stack([np.ones(len(subsets)), subsets])
    beta = np.linalg.lstsq(design, losses, rcond=None)[0][1:]
    config = PolicyConfig(policy="surrogate", subset_count=300, seed=3)
    surrogate = np.array(list(compute_scores(estimator, config).values()))
    np.testing.assert_allclose(
        surrogate - surrogate.mean(), beta - beta.mean(), rtol=1e-2, atol=1e-5
    )


def test_uniform_policy_gives_the_uniform_mixture_even_without_a_target():
    estimator = SubsetEstimator(3)
    for name in ("a", "b", "c", "d"):
        estimator.add_task_rows(name, np.ones((2, 3)), np.zeros(2))
    scores, weights = compute_mixture(estimator, PolicyConfig(policy="uniform"))
    assert scores == {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
    assert weights == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25})
    with pytest.raises(PreconditionError):
        compute_scores(estimator, PolicyConfig(policy="ensemble"))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_single_task_gets_a_finite_score_and_all_the_mass(policy):
    estimator, labels = planted_estimator(3, helpful=1, harmful=0, neutral=0)
    scores, weights = compute_mixture(estimator, PolicyConfig(policy=policy))
    (task,) = labels
    assert math.isfinite(scores[task])
    assert weights == {task: 1.0}


def test_two_tasks_use_singletons_and_the_helpful_one_wins():
    estimator, labels = planted_estimator(4, helpful=1, harmful=1, neutral=0)
    (good,), (bad,) = of_kind(labels, HELPFUL), of_kind(labels, HARMFUL)
    for policy in ("ensemble", "surrogate"):
        scores = compute_scores(estimator, PolicyConfig(policy=policy))
        # k = ⌈0.5·2⌉ = 1: the subsets are {good} and {bad}, so
        # score = L̂({t}) - L̂({other}).
        singles = estimator.estimate_named([[good], [bad]])
        assert scores[good] < 0 < scores[bad]
        if policy == "ensemble":
            assert scores[good] == pytest.approx(singles[0] - singles[1])


def test_no_tasks_give_no_scores():
    estimator = SubsetEstimator(2)
    assert compute_scores(estimator, PolicyConfig()) == {}


def test_draw_subsets_enumerates_small_cases_and_is_reproducible():
    small = draw_subsets(5, PolicyConfig(subset_count=100))
    assert small.shape == (10, 5)  # C(5, 3) = 10 subsets of size ⌈2.5⌉ = 3
    assert len({tuple(row) for row in small}) == 10
    big = draw_subsets(30, PolicyConfig(subset_count=200, subset_fraction=0.3, seed=7))
    assert big.shape == (200, 30) and (big.sum(axis=1) == 9).all()
    np.testing.assert_array_equal(
        big, draw_subsets(30, PolicyConfig(subset_count=200, subset_fraction=0.3, seed=7))
    )


def test_simplex_gradient_matches_finite_differences():
    estimator, _ = planted_estimator(5, helpful=2, harmful=2, neutral=1)
    stats = [estimator.statistics(t) for t in estimator.tasks]
    target = estimator.statistics(None)
    args = (
        np.array([s.hessian().ravel() for s in stats]),
        np.array([s.loss_gradient() for s in stats]),
        target.grads(),
        target.values(),
    )
    alpha = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    _, grad = simplex_loss_and_gradient(*args, alpha, 0.7)
    for t in range(5):
        step = np.zeros(5)
        step[t] = 1e-6
        up, _ = simplex_loss_and_gradient(*args, alpha + step, 0.7)
        down, _ = simplex_loss_and_gradient(*args, alpha - step, 0.7)
        assert grad[t] == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-9)


def test_mixture_sums_to_one_respects_the_floor_and_prefers_low_scores():
    scores = {"a": -3.0, "b": 0.0, "c": 5.0, "d": 40.0}
    weights = scores_to_mixture(scores, temperature=0.5, floor=0.05)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert min(weights.values()) >= 0.05 - 1e-12
    assert weights["a"] > weights["b"] > weights["c"] >= weights["d"]


def test_temperature_is_in_standard_errors_of_the_gap_to_the_best():
    scores = {"a": 0.0, "b": 0.02, "c": 0.10}
    gap = math.sqrt(2) * 0.01  # the standard error of a difference of two scores of σ 0.01
    weights = scores_to_mixture(scores, temperature=1.0, floor=0.0, error=0.01, margin=0.0)
    # b is 0.02 behind a, √2 standard errors of the gap: e^-√2 of its weight.
    assert weights["b"] / weights["a"] == pytest.approx(math.exp(-0.02 / gap))
    assert weights["c"] / weights["a"] == pytest.approx(math.exp(-0.10 / gap))
    # The same score gaps with ten times the noise give a much flatter mixture.
    noisy = scores_to_mixture(scores, temperature=1.0, floor=0.0, error=0.1, margin=0.0)
    assert noisy["b"] / noisy["a"] == pytest.approx(math.exp(-0.02 / (10 * gap)))
    # Within the margin a task ties with the best; beyond it, each standard error
    # of the gap costs e^(1/τ).
    tied = scores_to_mixture(scores, temperature=0.5, floor=0.0, error=0.01, margin=2.0)
    assert tied["b"] == pytest.approx(tied["a"])
    assert tied["c"] / tied["a"] == pytest.approx(math.exp(-(0.10 / gap - 2) / 0.5))
    with pytest.raises(InvalidArgumentError, match="error"):
        scores_to_mixture(scores, temperature=1.0, floor=0.0, error=-1.0)


def test_a_noisy_task_is_judged_by_its_own_standard_error():
    scores = {"best": 0.0, "noisy": 0.5, "clean": 0.5}
    # One σ for all (0.1): both 0.5/(√2·0.1) = 3.5 standard errors of the gap behind
    # the best, each gets e^(-2(3.5-2)) of its weight.
    shared = scores_to_mixture(scores, temperature=0.5, floor=0.0, error=0.1)
    assert shared["noisy"] == pytest.approx(shared["clean"])
    assert shared["noisy"] / shared["best"] == pytest.approx(
        math.exp(-2 * (0.5 / (math.sqrt(2) * 0.1) - 2)))
    # Per task: the gap's standard error is √(σ_t² + σ_b²); the noisy one (σ_t 0.4)
    # is within the tie margin of the best, the clean one is where one σ put it.
    own = scores_to_mixture(scores, temperature=0.5, floor=0.0, error=0.1,
                            errors={"best": 0.1, "noisy": 0.4, "clean": 0.1})
    assert own["noisy"] == pytest.approx(own["best"])
    assert own["clean"] == pytest.approx(shared["clean"] / shared["best"] * own["best"])
    with pytest.raises(InvalidArgumentError):
        scores_to_mixture(scores, temperature=0.5, floor=0.0, errors={"noisy": -1.0})
    # task_errors: each task's spread over replicates, their root mean square σ.
    replicates = np.random.default_rng(0).normal(size=(200, 10)) * ([0.4] + [0.1] * 9)
    each = task_errors(replicates)
    assert each[0] > 2 * each[1:].max()
    assert standard_error(replicates) == pytest.approx(float(np.sqrt(np.mean(each**2))))
    assert task_errors(replicates[:1]).tolist() == [0.0] * 10


def test_score_error_shrinks_with_more_sketched_rows():
    def error(rows: int) -> float:
        target_g, target_f, tasks, _ = planted_tasks(2, 2, 1, rows, 24, 3, noise=3.0)
        estimator = SubsetEstimator(24)
        estimator.add_target_rows(target_g, target_f)
        for name, (g, f) in tasks.items():
            estimator.add_task_rows(name, g, f)
        config = PolicyConfig()
        assert score_error(estimator, config) == score_error(estimator, config)  # seeded
        return score_error(estimator, config)

    few, many = error(40), error(640)
    assert 0 < many < few / 2  # ≈ 1/√rows: a 16x larger sample, ≈ 4x smaller error
    assert score_error(planted_estimator(0)[0], PolicyConfig(policy="uniform")) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_redrawing_the_sketched_rows_moves_the_mixture_by_at_most_a_tenth(seed):
    # One anchor: a fixed pool of rows per source; two sketches draw 64 rows each.
    target_g, target_f, tasks, _ = planted_tasks(3, 3, 2, 2000, 24, seed, noise=3.0)
    rng = np.random.default_rng(seed + 100)

    def mixture() -> dict[str, float]:
        estimator = SubsetEstimator(24)
        rows = rng.choice(2000, 64, replace=False)
        estimator.add_target_rows(target_g[rows], target_f[rows])
        for name, (g, f) in tasks.items():
            rows = rng.choice(2000, 64, replace=False)
            estimator.add_task_rows(name, g[rows], f[rows])
        return compute_mixture(estimator, PolicyConfig())[1]

    first, second = mixture(), mixture()
    assert 0.5 * sum(abs(first[t] - second[t]) for t in first) <= 0.1


def test_smoothing_blends_in_the_previous_mixture():
    new = {"a": 0.8, "b": 0.2, "late": 0.5}
    smoothed = smooth_mixture({"a": 0.2, "b": 0.8}, new, 0.25)
    assert sum(smoothed.values()) == pytest.approx(1.0)
    raw = {"a": 0.75 * 0.8 + 0.25 * 0.2, "b": 0.75 * 0.2 + 0.25 * 0.8, "late": 0.5}
    total = sum(raw.values())
    assert smoothed == pytest.approx({t: w / total for t, w in raw.items()})
    assert smooth_mixture(None, {"a": 1.0}, 0.5) == {"a": 1.0}
    assert smooth_mixture({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, 0.0) == {"a": 0.9, "b": 0.1}


def test_capped_tasks_give_their_excess_to_the_others_in_proportion():
    capped = cap_weights({"thin": 0.7, "a": 0.2, "b": 0.1}, {"thin"}, 0.25)
    assert capped == pytest.approx({"thin": 0.25, "a": 0.2 + 0.45 * 2 / 3, "b": 0.1 + 0.45 / 3})
    assert cap_weights({"a": 0.6, "b": 0.4}, {"a", "b"}, 0.1) == {"a": 0.6, "b": 0.4}


def test_mixture_temperature_is_scale_free():
    scores = {"a": -0.2, "b": 0.1, "c": 0.4}
    tiny = {k: 1e-5 * v + 7.0 for k, v in scores.items()}
    base = scores_to_mixture(scores, temperature=0.5, floor=0.0)
    assert scores_to_mixture(tiny, temperature=0.5, floor=0.0) == pytest.approx(base)
    # A higher temperature flattens the mixture.
    flat = scores_to_mixture(scores, temperature=5.0, floor=0.0)
    assert flat["a"] < base["a"] and flat["c"] > base["c"]


def test_mixture_edge_cases_and_errors():
    assert scores_to_mixture({}, temperature=1.0, floor=0.1) == {}
    equal = scores_to_mixture({"a": 2.0, "b": 2.0}, temperature=1.0, floor=0.0)
    assert equal == {"a": 0.5, "b": 0.5}
    with pytest.raises(InvalidArgumentError, match="floor"):
        scores_to_mixture({"a": 0.0, "b": 1.0, "c": 2.0}, temperature=1.0, floor=1 / 3)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        scores_to_mixture({"a": 0.0}, temperature=0.0, floor=0.0)
    with pytest.raises(NonFiniteError):
        scores_to_mixture({"a": 0.0, "b": math.nan}, temperature=1.0, floor=0.0)


def test_threshold_and_top_k_selection():
    scores = {"a": 0.3, "b": -0.2, "c": -0.5, "d": 0.0}
    assert select_threshold(scores, 0.0) == ["c", "b"]
    assert select_threshold(scores, 1.0) == ["c", "b", "d", "a"]
    assert select_top_k(scores, 2) == ["c", "b"]
    assert select_top_k(scores, 10) == ["c", "b", "d", "a"]
    with pytest.raises(InvalidArgumentError):
        select_top_k(scores, -1)


def test_forward_selection_keeps_only_helpful_tasks_and_reports_their_loss():
    estimator, labels = planted_estimator(6)
    selected, loss = forward_selection(estimator)
    assert selected and all(labels[t] == HELPFUL for t in selected)
    assert loss < estimator.anchor_loss()
    assert loss == pytest.approx(float(estimator.estimate_named([selected])[0]))
    # No single remaining task lowers L̂ further (the stopping rule).
    rest = [t for t in estimator.tasks if t not in selected]
    assert estimator.estimate_named([[*selected, t] for t in rest]).min() >= loss


def test_forward_selection_selects_nothing_when_every_task_hurts():
    estimator, _ = planted_estimator(7, helpful=0, harmful=3, neutral=0)
    selected, loss = forward_selection(estimator, mode="exact")
    assert selected == []
    assert loss == estimator.anchor_loss()
