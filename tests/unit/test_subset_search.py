"""``subset_search``: backward elimination on L̂ finds tasks that help only together.

Planted sketches: the target needs two directions (half of its rows along
u₁, half along u₂). In `helpful_pair`, task `left` moves mostly along u₁ and
a little against u₂, `right` along u₂ and as much against u₁, so each alone
overshoots the other half of the target; `copy`, `against` and `noise` are
distractors. In `pair_only` neither task of the pair helps alone at all.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradmix.server.compose import compose_mixture
from gradmix.server.errors import InvalidArgumentError
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.policies import POLICIES, PolicyConfig, task_scales
from gradmix.server.selection import backward_elimination, forward_selection

DIM = 16
LAMBDA = 0.1
U1, U2, U3, U4 = np.eye(DIM)[:4]


def planted(tasks: list[tuple[str, np.ndarray]],
            counts: dict[str, int] | None = None) -> SubsetEstimator:
    """Target and `tasks` rows along their directions; 300 rows a task unless `counts` says."""
    rng = np.random.default_rng(0)

    def rows(direction: np.ndarray, count: int) -> np.ndarray:
        return np.stack([direction] * count) + 0.2 * rng.standard_normal((count, DIM))

    estimator = SubsetEstimator(DIM, regularization=LAMBDA)
    target = np.concatenate([rows(U1, 200), rows(U2, 200)])
    estimator.add_target_rows(target, np.zeros(len(target)))
    for name, direction in tasks:
        count = (counts or {}).get(name, 300)
        estimator.add_task_rows(name, rows(direction, count), np.zeros(count))
    return estimator


def helpful_pair() -> SubsetEstimator:
    return planted([("left", U1 - 0.3 * U2), ("right", U2 - U1), ("copy", 0.3 * U2 - U1),
                    ("against", -U1 - U2), ("noise", U4)])


def pair_only() -> SubsetEstimator:
    return planted([("left", U1 - 0.8 * U2), ("right", 1.3 * (U2 - 0.8 * U1)),
                    ("against", -U1 - U2), ("aside", U3)])


def eliminate(estimator: SubsetEstimator, tolerance: float = 0.05) -> list[str]:
    return backward_elimination(estimator, estimator.tasks, scales=task_scales(estimator),
                                regularization=LAMBDA, tolerance=tolerance)


def test_backward_elimination_keeps_a_pair_that_forward_selection_cannot_start() -> None:
    estimator = pair_only()
    alone = estimator.estimate_named([["left"], ["right"]])
    together = estimator.estimate_named([["left", "right"]])[0]
    assert (alone > estimator.anchor_loss()).all()  # each alone hurts the target
    assert together < estimator.anchor_loss() - 0.1  # together they help
    assert forward_selection(estimator)[0] == []
    assert eliminate(estimator) == ["left", "right"]


def test_backward_elimination_arguments() -> None:
    estimator = helpful_pair()
    assert eliminate(estimator) == ["left", "right"]
    assert backward_elimination(estimator, [], scales=task_scales(estimator),
                                regularization=LAMBDA, tolerance=0.05) == []
    assert backward_elimination(estimator, ["noise"], scales=task_scales(estimator),
                                regularization=LAMBDA, tolerance=0.05) == ["noise"]
    for bad in (-0.1, float("nan")):
        with pytest.raises(InvalidArgumentError):
            eliminate(estimator, tolerance=bad)


def test_subset_search_gives_the_pair_the_blend_scores_alone_would_not() -> None:
    estimator = helpful_pair()
    ensemble = compose_mixture(estimator.tasks, estimator,
                               PolicyConfig(policy="ensemble", regularization=LAMBDA))
    search = compose_mixture(estimator.tasks, estimator,
                             PolicyConfig(policy="subset_search", regularization=LAMBDA))
    # One task at a time, `left` scores far better than `right`: the scores' mixture leans on it.
    assert ensemble.weights["left"] > 2 * ensemble.weights["right"]
    assert search.weights["left"] == pytest.approx(search.weights["right"])
    assert search.weights["left"] + search.weights["right"] > 0.99
    assert search.estimated_loss < ensemble.estimated_loss - 0.01
    assert search.scores == ensemble.scores  # the same scores, a different mixture
    assert search.subsets_estimated > ensemble.subsets_estimated  # the search is counted


def test_only_subset_search_searches() -> None:
    assert [name for name, p in POLICIES.items() if p.searches_subsets] == ["subset_search"]


def test_subset_search_scores_count_the_subsets_ensemble_draws() -> None:
    from gradmix.server.policies import subsets_scored

    for n in (3, 12):
        assert subsets_scored(n, PolicyConfig(policy="subset_search")) == \
            subsets_scored(n, PolicyConfig(policy="ensemble")) > 0
    assert subsets_scored(12, PolicyConfig(policy="gradient_similarity")) == 0


def test_a_lone_task_kept_by_elimination_leaves_the_scores_mixture_as_it_is() -> None:
    # The scores put `good` first; elimination keeps `fair` alone. Its one-hot mixture
    # is no candidate: what the policy gives is the scores' own (ensemble's).
    estimator = planted([("good", U1 + U2), ("fair", U1 + 0.7 * U2), ("against", -U1 - U2)])
    assert eliminate(estimator, tolerance=0.15) == ["fair"]
    ensemble = compose_mixture(estimator.tasks, estimator,
                               PolicyConfig(policy="ensemble", regularization=LAMBDA))
    search = compose_mixture(estimator.tasks, estimator,
                             PolicyConfig(policy="subset_search", regularization=LAMBDA))
    assert ensemble.weights["good"] > 0.85
    assert search.weights == pytest.approx(ensemble.weights)
    assert search.subsets_estimated > ensemble.subsets_estimated  # searched all the same


def test_a_set_some_task_alone_beats_leaves_the_scores_mixture_as_it_is() -> None:
    # Elimination drifts: it drops `good` first (within its tolerance) and ends on
    # {x, y}, whose equal mixture L̂ rates worse than `good` alone. No candidate then.
    estimator = planted([("good", U1 + U2), ("x", 0.8 * U1 + 0.2 * U2 - 0.8 * U3),
                         ("y", -0.2 * U1 + 1.1 * U2 + 0.4 * U4)])
    assert eliminate(estimator, tolerance=0.15) == ["x", "y"]
    scales = task_scales(estimator)
    alpha = np.array([[scales[0], 0.0, 0.0], [0.0, scales[1] / 2, scales[2] / 2]])
    good, pair = estimator.estimate(alpha > 0, alpha, regularization=LAMBDA)
    assert good < pair
    ensemble = compose_mixture(estimator.tasks, estimator,
                               PolicyConfig(policy="ensemble", regularization=LAMBDA))
    search = compose_mixture(estimator.tasks, estimator,
                             PolicyConfig(policy="subset_search", regularization=LAMBDA))
    assert search.weights == pytest.approx(ensemble.weights)
    assert search.weights["x"] != pytest.approx(search.weights["y"])  # not the pair's


def test_a_pair_of_one_task_and_a_thin_one_is_no_candidate() -> None:
    # With every task sketched in full, elimination keeps the pair and its equal
    # mixture is taken. With `left` thin (40 rows against the target's 400), the cap
    # holds it at 1/n and hands the rest to `right`: that is `right` alone, and the
    # mixture is the scores' own, as for a lone task.
    tasks = [("left", U1 - 0.8 * U2), ("right", 1.3 * (U2 - 0.8 * U1)), ("against", -U1 - U2),
             ("aside", U3)]
    full = planted(tasks)
    taken = compose_mixture(full.tasks, full, PolicyConfig(policy="subset_search",
                                                           regularization=LAMBDA))
    assert taken.weights["left"] == pytest.approx(taken.weights["right"], abs=0.01)
    thin = planted(tasks, counts={"left": 40})
    assert sorted(eliminate(thin, tolerance=0.15)) == ["left", "right"]
    ensemble = compose_mixture(thin.tasks, thin, PolicyConfig(policy="ensemble",
                                                              regularization=LAMBDA))
    search = compose_mixture(thin.tasks, thin, PolicyConfig(policy="subset_search",
                                                             regularization=LAMBDA))
    assert search.weights == pytest.approx(ensemble.weights)
    assert search.weights["left"] <= 1 / 4 + 1e-9


def test_a_set_without_the_best_scoring_task_leaves_the_scores_mixture_as_it_is() -> None:
    # The scores put t0 first (t1 close behind); elimination ends on {t1, t3}, whose
    # equal mixture L̂ rates better than every task alone. The estimates disagree
    # about t0: no candidate, the mixture is the scores' own.
    def direction(*c: float) -> np.ndarray:
        return c[0] * U1 + c[1] * U2 + c[2] * U3 + c[3] * U4

    estimator = planted([("t0", direction(0.9, 0.5, 0.6, 0.6)),
                         ("t1", direction(1.6, -0.5, 0.1, 0.6)),
                         ("t2", direction(1.0, -1.9, -0.4, -0.2)),
                         ("t3", direction(-0.8, 0.7, 0.2, -0.3))])
    ensemble = compose_mixture(estimator.tasks, estimator,
                               PolicyConfig(policy="ensemble", regularization=LAMBDA))
    assert min(ensemble.scores, key=lambda t: ensemble.scores[t]) == "t0"
    assert sorted(eliminate(estimator, tolerance=0.15)) == ["t1", "t3"]
    scales = task_scales(estimator)
    alpha = np.zeros((5, 4))
    alpha[np.arange(4), np.arange(4)] = scales
    alpha[4, [1, 3]] = scales[[1, 3]] / 2
    *alone, pair = estimator.estimate(alpha > 0, alpha, regularization=LAMBDA)
    assert pair < min(alone)
    search = compose_mixture(estimator.tasks, estimator,
                             PolicyConfig(policy="subset_search", regularization=LAMBDA))
    assert search.weights == pytest.approx(ensemble.weights)


def test_elimination_estimates_the_mixture_a_set_would_be_published_with() -> None:
    # Equal mixtures: the pair that helps only together is kept. If `right` could get
    # at most 0.05 of any published mixture (capped, as a thin task is), the pair is
    # `left` alone by another name, which hurts: elimination does not keep it.
    estimator = pair_only()
    assert eliminate(estimator) == ["left", "right"]
    right = estimator.tasks.index("right")

    def right_capped(kept: list[int]) -> np.ndarray:
        weights = np.full(len(kept), 1.0 / len(kept))
        if right in kept and len(kept) > 1:
            weights[:] = 0.95 / (len(kept) - 1)
            weights[kept.index(right)] = 0.05
        return weights

    equal = backward_elimination(estimator, estimator.tasks, scales=task_scales(estimator),
                                 regularization=LAMBDA, tolerance=0.05,
                                 weigh=lambda kept: np.full(len(kept), 1.0 / len(kept)))
    assert equal == ["left", "right"]
    capped = backward_elimination(estimator, estimator.tasks, scales=task_scales(estimator),
                                  regularization=LAMBDA, tolerance=0.05, weigh=right_capped)
    assert capped != ["left", "right"]
