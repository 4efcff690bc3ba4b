"""The mixture is chosen by its estimated loss: complementary tasks keep a blend.

Planted sketches: the target needs two directions (60% of its rows along u₁,
40% along u₂); task `first` moves only along u₁, task `second` only along
u₂, `against` along -u₁, `aside` along a third direction. Scored one at a
time `first` is clearly best, and the job's temperature alone would put
nearly all weight on it; the estimate of the whole mixture prefers a blend.
"""

from __future__ import annotations

import numpy as np
from gradmix.server.compose import compose_mixture
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.mixture import scores_to_mixture
from gradmix.server.policies import PolicyConfig, compute_scores, score_error

DIM = 32


def _rows(rng: np.random.Generator, directions: list[np.ndarray], count: int) -> np.ndarray:
    picks = rng.integers(0, len(directions), count)
    return np.stack([directions[i] for i in picks]) + 0.2 * rng.standard_normal((count, DIM))


def planted() -> SubsetEstimator:
    rng = np.random.default_rng(0)
    u1, u2, u3 = np.eye(DIM)[:3]
    estimator = SubsetEstimator(DIM, regularization=1.0)
    target = np.concatenate([_rows(rng, [u1], 240), _rows(rng, [u2], 160)])
    estimator.add_target_rows(target, np.zeros(len(target)))
    for name, direction in (("first", u1), ("second", u2), ("against", -u1), ("aside", u3)):
        estimator.add_task_rows(name, _rows(rng, [direction], 300), np.zeros(300))
    return estimator


def test_complementary_tasks_keep_a_blend_the_sharpest_mixture_would_drop() -> None:
    estimator = planted()
    # `ensemble`: its softer candidates (subset_search would give the pair 50/50 first)
    config = PolicyConfig(policy="ensemble", regularization=0.1)  # a long horizon: one
    # direction saturates
    tasks = list(estimator.tasks)
    scores = compute_scores(estimator, config)
    sharpest = scores_to_mixture(scores, temperature=config.temperature,
                                 floor=config.floor_for(len(tasks)),
                                 error=score_error(estimator, config))
    assert sharpest["first"] > 0.9 and sharpest["second"] < 0.05  # what scores alone give

    weights = compose_mixture(tasks, estimator, config).weights

    assert weights["second"] > 0.2
    assert weights["first"] > weights["second"]
    assert weights["against"] < 0.05 and weights["aside"] < 0.1
