"""Discrete task selection: a subset instead of a mixture.

* `select_threshold` / `select_top_k` pick tasks by score (lower = better).
* `forward_selection` builds a subset greedily on the estimated loss L̂: start
  from ∅; each round estimate L̂(S ∪ {t}) for every remaining t in one batched
  call and add the task that lowers L̂ most; stop when no task lowers it. The
  method's reference code makes one pass in task-index order and keeps a task
  if it helps; the greedy version does not depend on the order and considers
  every task again after each addition (at most n rounds, O(n²) estimates).
* `backward_elimination` goes the other way, on the tasks' equal mixture:
  start from every given task and remove, one at a time, the task whose
  removal leaves the lowest L̂, for as long as that stays within a tolerance
  of the best L̂ seen. It finds what forward selection cannot: two tasks
  that each hurt alone and help together (each covers half of the target;
  alone, a fine-tune on either one overshoots the other half), which no
  single-task step reaches. The tolerance makes it parsimonious: a task
  whose presence changes L̂ by noise-sized amounts is removed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


def backward_elimination(
    estimator: SubsetEstimator,
    tasks: Sequence[str],
    *,
    scales: np.ndarray,
    regularization: float,
    tolerance: float,
    on_estimate: Callable[[int], None] | None = None,
    weigh: Callable[[list[int]], np.ndarray] | None = None,
) -> list[str]:
    """The subset of `tasks` whose equal mixture L̂ rates best, preferring fewer tasks.

    A subset S is estimated with α_t = scales_t / |S| for t in S (`scales`
    in `estimator.tasks` order, e.g. `gradmix.server.policies.task_scales`),
    or α_t = scales_t · weigh(S)_t where the mixture of S is not the equal one
    (`weigh` maps S's columns in `estimator.tasks` to their weights, summing
    to 1: the mixture that would be published for S, e.g. with capped tasks).
    Each round estimates S minus each of its tasks in one batched call and
    keeps the lowest, while that L̂ is at most best + tolerance·(L̂(∅) − best),
    best the lowest L̂ seen so far (`tolerance` ≥ 0; 0: only removals that
    do not raise L̂ above the best). At most |tasks| − 1 rounds, O(|tasks|²)
    subsets; `on_estimate` is called with the number of each call's subsets.

    Returns:
        The tasks kept, in the order given (never empty when `tasks` is not).
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise InvalidArgumentError(f"tolerance must be finite and >= 0, got {tolerance}")
    columns = [estimator.tasks.index(t) for t in tasks]
    width = len(estimator.tasks)

    def estimated(kept_sets: list[list[int]]) -> np.ndarray:
        alpha = np.zeros((len(kept_sets), width))
        for row, kept in enumerate(kept_sets):
            alpha[row, kept] = 1.0 / len(kept) if weigh is None else weigh(kept)
        alpha *= scales
        if on_estimate is not None:
            on_estimate(len(kept_sets))
        return estimator.estimate(alpha > 0, alpha, regularization=regularization)

    kept = list(columns)
    if not kept:
        return []
    best = float(estimated([kept])[0])
    anchor = estimator.anchor_loss()
    while len(kept) > 1:
        trials = [[c for c in kept if c != removed] for removed in kept]
        losses = estimated(trials)
        pick = int(np.argmin(losses))
        best = min(best, float(losses[pick]))
        if losses[pick] > best + tolerance * max(0.0, anchor - best):
            break
        kept = trials[pick]
    return [estimator.tasks[c] for c in kept]
