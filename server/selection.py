"""Discrete task selection: a subset instead of a mixture.

* `select_threshold` / `select_top_k` pick tasks by score (lower = better).
* `forward_selection` builds a subset greedily on the estimated loss L̂: start
  from ∅; each round estimate L̂(S ∪ {t}) for every remaining t in one batched
  call and add the task that lowers L̂ most; stop when no task lowers it. The
  method's reference code makes one pass in task-index order and keeps a task
  if it helps; the greedy version does not depend on the order and considers
  every task again after each addition (at most n rounds, O(n²) estimates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from gradmix.server.errors import InvalidArgumentError, NonFiniteError
from gradmix.server.estimator import SubsetEstimator


def _ranked(scores: Mapping[str, float]) -> list[tuple[float, str]]:
    ranked = sorted((float(score), name) for name, score in scores.items())
    if any(not np.isfinite(score) for score, _ in ranked):
        raise NonFiniteError("scores contain NaN or Inf")
    return ranked


def select_threshold(scores: Mapping[str, float], threshold: float) -> list[str]:
    """Tasks whose score is strictly below `threshold`, best first (ties by name).

    With threshold 0 and ensemble/surrogate scores this keeps the tasks whose
    inclusion lowers the estimated target loss.
    """
    if not np.isfinite(threshold):
        raise InvalidArgumentError(f"threshold must be finite, got {threshold}")
    return [name for score, name in _ranked(scores) if score < threshold]


def select_top_k(scores: Mapping[str, float], k: int) -> list[str]:
    """The k lowest-scoring tasks, best first (ties by name); all if k ≥ n."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidArgumentError(f"k must be a nonnegative integer, got {k!r}")
    return [name for _, name in _ranked(scores)[:k]]


def forward_selection(
    estimator: SubsetEstimator,
    *,
    mode: str = "fast",
    on_estimate: Callable[[int], None] | None = None,
) -> tuple[list[str], float]:
    """Greedy forward stepwise selection on L̂ (see the module docstring).

    Args:
        estimator: the anchor's estimator.
        mode: "fast" or "exact".
        on_estimate: called with the number of subsets of each round it estimates.

    Returns:
        (selected tasks in the order they were added, L̂ of that subset).
        An empty selection returns L̂(∅).
    """
    tasks = estimator.tasks
    chosen = np.zeros(len(tasks), dtype=bool)
    order: list[str] = []
    best = estimator.anchor_loss()
    while not chosen.all():
        candidates = np.flatnonzero(~chosen)
        subsets = np.tile(chosen, (candidates.size, 1))
        subsets[np.arange(candidates.size), candidates] = True
        losses = estimator.estimate(subsets, mode=mode)
        if on_estimate is not None:
            on_estimate(len(subsets))
        pick = int(np.argmin(losses))
        if not losses[pick] < best:
            break
        best = float(losses[pick])
        chosen[candidates[pick]] = True
        order.append(tasks[candidates[pick]])
    return order, best
