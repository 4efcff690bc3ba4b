"""How a job's mixture is composed over active and pending tasks, and when it is new."""

from __future__ import annotations

import dataclasses

import pytest
from gradmix.demo.planted import planted_tasks
from gradmix.server.compose import SOFTER, compose_mixture, mixture_changed
from gradmix.server.estimator import SubsetEstimator
from gradmix.store import MixtureRecord
from gradmix.vocabulary.policy_settings import PolicyConfig


def estimator_with(tasks: list[str], *, target: bool = True) -> SubsetEstimator:
    grads, values, planted, _ = planted_tasks(2, 2, 0, rows=32, dim=8, seed=3)
    estimator = SubsetEstimator(8)
    if target:
        estimator.add_target_rows(grads, values)
    for name, (g, v) in zip(tasks, planted.values(), strict=False):
        estimator.add_task_rows(name, g, v)
    return estimator


def record(composition: object, anchor: str = "a0") -> MixtureRecord:
    return MixtureRecord(version=1, created_at=0.0, anchor=anchor, policy="ensemble",
                         **{f: getattr(composition, f) for f in ("weights", "scores", "states",
                                                                  "anchor_loss",
                                                                  "estimated_loss")})


@pytest.mark.parametrize("prior", [1.0, 0.5, 2.0])
def test_a_pending_task_gets_prior_weight_times_the_mean_active_weight(prior: float) -> None:
    config = PolicyConfig(subset_count=16, prior_weight=prior)
    mixture = compose_mixture(["a", "b", "late"], estimator_with(["a", "b"]), config)
    assert mixture.states == {"a": "active", "b": "active", "late": "pending"}
    assert sum(mixture.weights.values()) == pytest.approx(1.0)
    mean_active = (mixture.weights["a"] + mixture.weights["b"]) / 2
    assert mixture.weights["late"] == pytest.approx(prior * mean_active)
    assert mixture.scores["late"] == 0.0
    assert mixture.estimated_loss != mixture.anchor_loss


def test_without_target_rows_or_active_tasks_the_mixture_is_uniform() -> None:
    config = PolicyConfig(subset_count=16)
    no_target = compose_mixture(["a", "b", "c"], estimator_with(["a"], target=False), config)
    assert no_target.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert no_target.states["a"] == "active"
    no_anchor = compose_mixture(["a", "b"], None, config)
    assert no_anchor.weights == {"a": 0.5, "b": 0.5}
    assert set(no_anchor.states.values()) == {"pending"}
    assert compose_mixture([], None, config).weights == {}


def test_a_new_version_only_when_weights_states_tasks_or_anchor_change() -> None:
    config = PolicyConfig(subset_count=16)
    first = compose_mixture(["a", "b"], estimator_with(["a", "b"]), config)
    last = record(first)
    assert mixture_changed(None, "a0", first, 1e-6)
    assert not mixture_changed(last, "a0", first, 1e-6)
    assert mixture_changed(last, "a1", first, 1e-6)
    nudged = dict(first.weights)
    nudged["a"] += 1e-9
    assert not mixture_changed(last, "a0", dataclasses.replace(first, weights=nudged), 1e-6)
    nudged["a"] += 1e-3
    assert mixture_changed(last, "a0", dataclasses.replace(first, weights=nudged), 1e-6)
    pending = dataclasses.replace(first, states={"a": "active", "b": "pending"})
    assert mixture_changed(last, "a0", pending, 1e-6)
    grown = compose_mixture(["a", "b", "c"], estimator_with(["a", "b"]), config)
    assert mixture_changed(last, "a0", grown, 1e-6)


def test_a_known_standard_error_skips_the_bootstrap_and_counts_what_was_estimated() -> None:
    estimator = estimator_with(["a", "b", "c", "d"])
    # `ensemble`: subset_search adds its elimination's subsets (test_subset_search).
    config = PolicyConfig(policy="ensemble", subset_count=16, bootstrap=4)
    fresh = compose_mixture(["a", "b", "c", "d"], estimator, config)
    # C(4, 2) = 6 subsets scored once, then 4 replicates of the same 6, L̂ of the
    # candidate mixtures (one per SOFTER step and the uniform one), and L̂ of the mixture.
    candidates = len(SOFTER) + 1
    assert fresh.subsets_estimated == 6 + 4 * 6 + candidates + 1
    assert fresh.score_error > 0
    reused = compose_mixture(["a", "b", "c", "d"], estimator, config, error=fresh.score_error)
    assert reused.subsets_estimated == 6 + candidates + 1
    assert reused.weights == pytest.approx(fresh.weights)


def test_smoothing_blends_the_mixture_in_force_into_the_active_weights() -> None:
    estimator = estimator_with(["a", "b", "c", "d"])
    sharp = compose_mixture(["a", "b", "c", "d"], estimator, PolicyConfig(subset_count=16))
    before = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25, "gone": 0.5}
    config = PolicyConfig(subset_count=16, smoothing=0.5)
    smoothed = compose_mixture(["a", "b", "c", "d"], estimator, config, previous=before)
    for task, weight in sharp.weights.items():
        assert smoothed.weights[task] == pytest.approx(0.5 * weight + 0.125)
