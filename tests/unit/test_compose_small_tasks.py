"""A task whose pool ran out at the sketch (fewer rows than the target and the
largest task) is capped at the uniform share; equal small tasks are not.

Planted sketches: the target moves along u₁; `small` moves along u₁ too (the
best score by far), `wide` and `other` along weaker mixes of u₁ and noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradmix.server.compose import THIN_ROWS, compose_mixture
from gradmix.server.estimator import SubsetEstimator
from gradmix.server.policies import PolicyConfig

DIM = 16


def planted(small_rows: int, other_rows: int, target_rows: int = 256) -> SubsetEstimator:
    rng = np.random.default_rng(1)
    u1 = np.eye(DIM)[0]

    def rows(strength: float, count: int) -> np.ndarray:
        return strength * u1 + 0.3 * rng.standard_normal((count, DIM))

    estimator = SubsetEstimator(DIM, regularization=1.0)
    estimator.add_target_rows(rows(1.0, target_rows), np.zeros(target_rows))
    estimator.add_task_rows("small", rows(1.0, small_rows), np.zeros(small_rows))
    estimator.add_task_rows("wide", rows(0.3, other_rows), np.zeros(other_rows))
    estimator.add_task_rows("other", rows(-0.2, other_rows), np.zeros(other_rows))
    return estimator


def test_a_task_sketched_in_full_below_the_others_is_capped_at_the_uniform_share() -> None:
    weights = compose_mixture(["small", "wide", "other"], planted(48, 256), PolicyConfig()).weights
    assert weights["small"] == pytest.approx(1 / 3)
    assert weights["wide"] > weights["other"]


def test_tasks_all_small_alike_are_not_capped() -> None:
    weights = compose_mixture(["small", "wide", "other"], planted(48, 48), PolicyConfig()).weights
    assert weights["small"] > 0.4  # above the cap 1/3


def test_a_target_with_fewer_rows_than_the_tasks_caps_nothing_above_it() -> None:
    estimator = planted(48, 256, target_rows=48)
    weights = compose_mixture(["small", "wide", "other"], estimator, PolicyConfig()).weights
    assert weights["small"] > 0.4  # above the cap 1/3
    assert THIN_ROWS < 48
